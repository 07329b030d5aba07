"""Merging weights: a LoRA adapter into its base model (embedder or reranker), and checkpoints with each other by
slerp."""

from __future__ import annotations

from pathlib import Path

import torch

from .files import replace_dir


def merge_adapter(base_model: str, adapter_dir: str | Path, out: str | Path, dtype: torch.dtype = torch.float32):
    """Fold a LoRA adapter into a fresh full-precision copy of its base and save a plain
    sentence-transformers folder (prompts included) that loads without peft or this library.

    The base is reloaded unquantised: merging into 4-bit weights would round the update away.
    """
    from sentence_transformers import SentenceTransformer

    from .encode import prepare
    from .models import resolve

    adapter_model = SentenceTransformer(str(adapter_dir), device="cpu")
    model = SentenceTransformer(resolve(base_model), device="cpu", model_kwargs={"dtype": dtype})
    model[0].auto_model = fold(model[0].auto_model, adapter_dir)
    model.prompts = dict(adapter_model.prompts)
    model.max_seq_length = adapter_model.max_seq_length
    prepare(model)  # saved with left padding and the end token, for plain SentenceTransformer(path) users
    with replace_dir(out) as tmp:
        model.save(str(tmp))
    return Path(out)


def merge_reranker(base_model: str, adapter_dir: str | Path, out: str | Path, max_length: int = 512) -> Path:
    """Fold a LoRA adapter into an unquantised copy of its base; a plain CrossEncoder folder with the template."""
    from .rerank import load_reranker

    model = load_reranker(base_model, device="cpu", max_length=max_length)
    model[0].model = fold(model[0].model, adapter_dir)
    with replace_dir(out) as tmp:
        model.save(str(tmp))
    return Path(out)


def fold(module: torch.nn.Module, adapter_dir: str | Path) -> torch.nn.Module:
    """The module with the adapter's LoRA update added into its weights (peft's merge_and_unload)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(module, str(adapter_dir)).merge_and_unload()


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation between two tensors seen as flat vectors (Shoemake 1985), the merge the
    Qwen3-Embedding paper applies to its checkpoints; falls back to linear when they are (anti)parallel.
    Norms are interpolated linearly, so t=0 gives `a` and t=1 gives `b` exactly."""
    if not torch.is_floating_point(a):
        return a if t < 0.5 else b
    a32, b32 = a.double().flatten(), b.double().flatten()
    na, nb = a32.norm(), b32.norm()
    if na < eps or nb < eps:
        return ((1 - t) * a32 + t * b32).reshape(a.shape).to(a.dtype)
    cos = torch.clamp((a32 / na) @ (b32 / nb), -1.0, 1.0)
    omega = torch.arccos(cos)
    if omega.abs() < 1e-4 or (torch.pi - omega).abs() < 1e-4:
        mixed = (1 - t) * a32 + t * b32
    else:
        direction = (torch.sin((1 - t) * omega) * a32 / na + torch.sin(t * omega) * b32 / nb) / torch.sin(omega)
        mixed = direction * ((1 - t) * na + t * nb)
    return mixed.reshape(a.shape).to(a.dtype)


def slerp_models(model_a: str | Path, model_b: str | Path, t: float, out: str | Path | None = None):
    """Interpolate two sentence-transformers models of one architecture tensor by tensor (t=0: a, t=1: b), with
    b's prompts (the fine-tuned model's, when b is one). Returns the merged model; saves it when `out` is given."""
    from sentence_transformers import SentenceTransformer

    a = SentenceTransformer(str(model_a), device="cpu")
    b = SentenceTransformer(str(model_b), device="cpu")
    b_state = b.state_dict()
    merged = {k: slerp(v, b_state[k], t) for k, v in a.state_dict().items()}
    a.load_state_dict(merged)
    a.prompts = dict(b.prompts)
    if out is not None:
        with replace_dir(out) as tmp:
            a.save(str(tmp))
    return a
