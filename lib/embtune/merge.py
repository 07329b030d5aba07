"""Merging weights: a LoRA adapter into its base model (embedder or reranker), and two checkpoints by slerp.

Both work on the saved folders, one tensor at a time: each tensor is read from the safetensors files, combined
in float32 (on the GPU when there is one, in slices on the CPU) and written back in the checkpoint's own dtype,
so a 4B model merges and interpolates in a free Colab's 12.7 GB of RAM, which whole models in memory (peft's
`merge_and_unload` beside the adapter model, a state dict per checkpoint, float64 copies) do not fit.
safetensors' own API reads through a memory map, whose pages stay resident once read, and writes only whole
dictionaries, hence `SafetensorsFile` and `write_safetensors`, which read and write one tensor at a time.

An adapter folder is read as files, never loaded as a model: unsloth's save puts the base `config.json` beside
the adapter, and transformers then takes the folder for a whole model and fails to find its weights.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import torch

from .files import atomic_path, replace_dir

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}  # fmt: skip
CODES = {dtype: code for code, dtype in DTYPES.items()}
SLICE = 1 << 24  # elements combined at a time: 64 MiB of float32


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class SafetensorsFile:
    """One tensor at a time from a safetensors file, read with plain reads into memory of its own."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        self.start = 8 + length
        self.meta = header.pop("__metadata__", None)
        self.header = header

    def keys(self) -> list[str]:
        return list(self.header)

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        return tuple(self.header[name]["shape"]), DTYPES[self.header[name]["dtype"]]

    def tensor(self, name: str, device: str = "cpu") -> torch.Tensor:
        begin, end = self.header[name]["data_offsets"]
        shape, dtype = self.spec(name)
        with open(self.path, "rb") as f:
            f.seek(self.start + begin)
            data = bytearray(f.read(end - begin))
        flat = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        return flat.view(dtype).reshape(shape).to(device)


def write_safetensors(path: Path, specs: list[tuple[str, tuple[int, ...], torch.dtype]],
                      tensor: Callable[[str], torch.Tensor], metadata: dict | None = None) -> None:  # fmt: skip
    """Write a safetensors file from (name, shape, dtype) specs, asking `tensor(name)` for one tensor at a time
    (the format: a little-endian u64 header length, the JSON header, then the raw tensors in header order)."""
    header, offset = {}, 0
    for name, shape, dtype in specs:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape, dtype in specs:
            value = tensor(name).to(dtype).cpu().contiguous()
            if tuple(value.shape) != tuple(shape):
                raise ValueError(f"{name}: shape {tuple(value.shape)}, expected {tuple(shape)}")
            if value.numel():
                f.write(value.reshape(-1).view(torch.uint8).numpy())  # the tensor's own buffer, not a copy


def _specs(source: SafetensorsFile, dtype: torch.dtype | None) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of every tensor of a file, floats cast to `dtype` when given."""
    specs = []
    for name in source.keys():
        shape, stored = source.spec(name)
        specs.append((name, shape, dtype if dtype and stored.is_floating_point else stored))
    return specs


def _weights(folder: Path) -> list[Path]:
    """The safetensors files of a model folder's root (one file, or the shards of a large model)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no *.safetensors weights; re-save the model with safetensors")
    return files


def _copy_folder(source: Path, target: Path, skip: tuple[str, ...] = ()) -> None:
    for item in source.iterdir():
        if item.name in skip:
            continue
        if item.is_dir():
            shutil.copytree(item, target / item.name)
        else:
            shutil.copy2(item, target / item.name)


def lora_updates(adapter_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{base weight name: (A, B, scale)} of a plain LoRA adapter (peft's, also as unsloth saves it):
    W + scale * B @ A with scale = alpha / r (alpha / sqrt(r) for rsLoRA)."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    unsupported = [k for k in ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "modules_to_save")
                   if config.get(k)]  # fmt: skip
    if config.get("peft_type", "LORA") != "LORA" or unsupported:
        used = unsupported or config["peft_type"]
        raise ValueError(f"{adapter_dir}: only plain LoRA adapters merge here (this one uses {used})")
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    updates = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight").removeprefix("base_model.model.")
            updates[f"{module}.weight"] = (a, tensors[key.replace(".lora_A.", ".lora_B.")], scale)
    return updates


def merge_adapter(base_model: str, adapter_dir: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    """A plain model folder (sentence-transformers or CrossEncoder, as the adapter folder is) with the adapter's
    LoRA update added into the base weights: the adapter folder's files (prompts, tokenizer as trained, modules)
    with the base's `config.json` and merged weights, in the base checkpoint's dtype unless `dtype` is given.
    It loads without peft or this library."""

    from .models import resolve

    base, adapter = Path(resolve(base_model)), Path(adapter_dir)
    updates = lora_updates(adapter)
    device = _device()
    with replace_dir(out) as tmp:
        _copy_folder(adapter, tmp, skip=(*ADAPTER_FILES, "config.json"))
        shutil.copy2(base / "config.json", tmp / "config.json")
        for index in base.glob("*.safetensors.index.json"):
            shutil.copy2(index, tmp / index.name)
        for weights in _weights(base):
            source = SafetensorsFile(weights)

            def merged(name, source=source):
                weight = source.tensor(name, device)
                if name not in updates:
                    return weight
                a, b, scale = updates.pop(name)
                return weight.float() + scale * (b.to(device).float() @ a.to(device).float())

            write_safetensors(tmp / weights.name, _specs(source, dtype), merged, source.meta)
        if updates:
            raise ValueError(f"{adapter}: LoRA weights for {sorted(updates)[:3]} match no weight of {base}")
    return Path(out)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation between two tensors seen as flat vectors (Shoemake 1985), the merge the
    Qwen3-Embedding paper applies to its checkpoints; linear when they are (anti)parallel. Norms are interpolated
    linearly, so t=0 gives `a` and t=1 gives `b`. Sums and products in float32, a slice at a time; the result in
    a's dtype."""
    if not torch.is_floating_point(a):
        return a if t < 0.5 else b
    if t in (0, 1):
        return (a if t == 0 else b).to(a.dtype)
    fa, fb = a.reshape(-1), b.reshape(-1)
    step = SLICE  # on a GPU too: float32 copies of a whole embedding matrix would be 3 GB for Qwen3-4B
    pieces = [slice(i, i + step) for i in range(0, fa.numel(), step)]
    na = math.sqrt(sum(float(fa[p].float().square().sum()) for p in pieces))
    nb = math.sqrt(sum(float(fb[p].float().square().sum()) for p in pieces))
    ca, cb = 1 - t, t
    if na > eps and nb > eps:
        dot = sum(float(fa[p].float() @ fb[p].float()) for p in pieces)
        omega = math.acos(max(-1.0, min(1.0, dot / (na * nb))))
        if 1e-4 < omega < math.pi - 1e-4:
            norm = (1 - t) * na + t * nb
            ca = math.sin((1 - t) * omega) / math.sin(omega) * norm / na
            cb = math.sin(t * omega) / math.sin(omega) * norm / nb
    out = torch.empty_like(fa)
    for p in pieces:
        out[p] = ca * fa[p].float() + cb * fb[p].float()
    return out.reshape(a.shape)


def slerp_models(model_a: str | Path, model_b: str | Path, t: float, out: str | Path) -> Path:
    """Interpolate two saved models of one architecture tensor by tensor (t=0: a, t=1: b) into `out`: b's folder
    (its prompts and tokenizer, the fine-tuned model's when b is one) with interpolated weights, in b's dtype.
    Tensors are paired by name within each folder of weights (the root, and each module's), however sharded."""
    a, b = Path(model_a), Path(model_b)
    device = _device()
    with replace_dir(out) as tmp:
        _copy_folder(b, tmp)
        for weights_b in sorted(b.rglob("*.safetensors")):
            source_b = SafetensorsFile(weights_b)
            in_a = {}
            for weights_a in sorted((a / weights_b.parent.relative_to(b)).glob("*.safetensors")):
                source_a = SafetensorsFile(weights_a)
                in_a.update(dict.fromkeys(source_a.keys(), source_a))
            missing = set(source_b.keys()) - set(in_a)
            if missing:
                raise ValueError(f"{a} lacks {sorted(missing)[:3]}: not the architecture of {b}")

            def mixed(name, source_b=source_b, in_a=in_a):
                return slerp(in_a[name].tensor(name, device), source_b.tensor(name, device), t)

            write_safetensors(tmp / weights_b.relative_to(b), _specs(source_b, None), mixed, source_b.meta)
    return Path(out)
