"""A memory plan for training, decided before any weight is loaded: the same on a CPU as on a GPU.

`estimate` adds up the peak memory of a training step from the model's config (layers, widths, heads, vocabulary,
parameter count), the padded lengths the data will have, the batch and how the model is trained: the weights in
the dtype they load in (a 16-bit checkpoint stays 16-bit on a CPU; 4-bit: half a byte per projection weight),
the trainable parameters with their gradients and AdamW's two states, and the activations autograd saves for the
backward pass. Those are counted tensor by tensor for a Qwen3/Llama-style decoder layer (the byte counts below
match what `torch.autograd.graph.saved_tensors_hooks` sees on Qwen3 with peft's LoRA, to 1 %): every layer keeps
the inputs of its norms in float32, the attention's queries, keys, values (repeated to the query heads when a
padding mask is given) and output, the MLP's intermediates, and per LoRA projection its dropped-out input and mask;
gradient checkpointing keeps only each layer's input and recomputes one layer at a time; eager attention adds the
softmax of every head over every key. The cached (GradCache) losses hold one mini-batch of one column at a time.

`plan_memory` compares the estimate with the memory there is (`available_memory`: free RAM within any cgroup limit
on a CPU, free GPU memory on a GPU) and decides what the user left open: gradient checkpointing first, then the
cached version of the same loss (GradCache: the same effective batch and gradients) with the largest mini-batch that
fits. What the user set explicitly is kept. If nothing fits it raises `NotEnoughMemory`, one line naming what would.
On a CPU, training with a cached loss calls `return_freed_blocks`, so that what the estimate counts as freed leaves
the process.

    how = embtune.lora.plan(config, path)                    # backend, quantisation, LoRA or full: from the config
    memory = plan_memory(config, path, how, dataset)         # before any weight is loaded; NotEnoughMemory if none fits
    print(memory)                                            # one line: estimate (parts), memory there is, choices
    config = memory.apply(config)                            # gradient_checkpointing, loss, mini_batch_size
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

GB = 1e9
HEADROOM = 0.9  # plan to use at most this share of the memory available: the OS, caches and other programs need some
# What the backward pass allocates beyond the saved activations (the gradients of one layer's intermediates, the
# attention kernel's buffers), as a share of one layer's saved activations of the same tokens; and the CPU
# allocator's overhead on the activations (glibc keeps freed blocks below 32 MB for reuse). Fitted on a 4-layer model
# of Qwen3-0.6B's widths (bench/memory_plan.py --layers 4: three settings within 16 % of the measured peak), then
# checked on the 28-layer model.
BACKWARD_WORKSPACE = 0.5
ALLOCATOR_OVERHEAD = 1.1
# Python, torch, transformers, sentence-transformers, datasets and peft imported, the Trainer built, before the
# weights: the resident memory of a fresh process that trains on the CPU (measured: 0.9-1.1 GB).
RUNTIME_CPU = 1.1 * GB
CUDA_CONTEXT = 0.6 * GB  # the CUDA context and cuBLAS workspace, when the GPU is not yet initialised
MERGE_SHARE = 1.0  # merge (0.56) and slerp (0.98) of the saved folders, as a share of the model's 16-bit size
CACHED = {"qwen3": "cached_qwen3", "mnrl": "cached_mnrl"}
DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2}


class NotEnoughMemory(RuntimeError):
    """The training step cannot fit in the memory available with any setting left to the plan."""


@dataclass(frozen=True)
class ModelShape:
    """What the memory of a transformer depends on, read from its config (no weights)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    n_params: int  # all parameters, embeddings included (`embtune.lora.count_params`)
    dtype_bytes: int = 4  # the checkpoint's dtype, which transformers 5 loads by default ("auto")
    gated_mlp: bool = True  # SwiGLU (gate, up, down) as Qwen3/Llama; False: BERT's up, down
    qk_norm: bool = True  # Qwen3 normalises queries and keys per head
    attention_dropout: float = 0.0  # BERT-style encoders train with dropout on the attention probabilities

    @classmethod
    def from_config(cls, path: str | Path, n_params: int | None = None) -> ModelShape:
        """From `config.json` (a transformers folder or the Transformer module of a sentence-transformers one);
        `n_params` is counted on the meta device when not given."""
        from transformers import AutoConfig

        from .lora import count_params

        c = AutoConfig.from_pretrained(str(path))
        c = getattr(c, "text_config", None) or c
        heads = c.num_attention_heads
        hidden = c.hidden_size
        dtype = str(c.dtype).removeprefix("torch.")  # transformers 5 reads an old torch_dtype into it
        return cls(
            layers=c.num_hidden_layers,
            hidden=hidden,
            intermediate=c.intermediate_size,
            heads=heads,
            kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=getattr(c, "head_dim", None) or hidden // heads,
            vocab=c.vocab_size,
            n_params=n_params if n_params is not None else count_params(str(path)),
            dtype_bytes=DTYPE_BYTES.get(dtype, 4),  # none given: float32
            gated_mlp=hasattr(c, "num_key_value_heads"),  # decoders (Qwen, Llama, Mistral...) have a gated MLP
            qk_norm="qwen3" in str(getattr(c, "model_type", "")),
            attention_dropout=float(getattr(c, "attention_probs_dropout_prob", None)
                                    or getattr(c, "attention_dropout", None) or 0.0),  # fmt: skip
        )

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def projections(self) -> dict[str, tuple[int, int]]:
        """(input, output) width of each linear projection of one layer, by peft's usual module names."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        out = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "up_proj": (h, i),
               "down_proj": (i, h)}  # fmt: skip
        if self.gated_mlp:
            out["gate_proj"] = (h, i)
        return out

    @property
    def linear_params(self) -> int:
        """Parameters in the layers' projections: what 4-bit quantisation packs (embeddings and norms stay)."""
        return self.layers * sum(a * b for a, b in self.projections().values())

    def lora_params(self, r: int, targets: list[str] | None = None) -> int:
        """Trainable parameters of a rank-r LoRA on `targets` (all projections when None)."""
        names = self.projections() if targets is None else [t for t in self.projections() if t in targets]
        return self.layers * sum(r * sum(self.projections()[n]) for n in names)


@dataclass(frozen=True)
class Setting:
    """One way to run the training step, as the estimate needs it."""

    batch_size: int
    lengths: tuple[int, ...]  # padded tokens per text column (anchor, positive, negatives...) of the longest batch
    gradient_checkpointing: bool = False
    mini_batch_size: int | None = None  # the cached (GradCache) losses' chunk; None: a plain loss
    full_finetune: bool = False
    quant: str = "none"  # none | 4bit | 8bit
    weight_bytes: int = 4  # bytes per (unquantised) weight as loaded
    activation_bytes: int = 4  # 2 under 16-bit weights or mixed precision, 4 in float32
    trainable_bytes: int = 4  # bytes per trainable parameter (its gradient and AdamW states likewise)
    lora_r: int = 16
    lora_targets: tuple[str, ...] | None = None  # None: every projection
    lora_dropout: float = 0.05
    attention: str = "sdpa"  # sdpa (flash kernels: no scores saved) | eager (the softmax of every head saved)
    device: str = "cpu"
    eval_batch_size: int = 32
    merge_choice: bool = True  # merge_with_base="auto": slerp candidates are loaded and scored after training

    @property
    def cached(self) -> bool:
        return self.mini_batch_size is not None


@dataclass
class Estimate:
    """Peak bytes of training, with its parts; `total` is the largest of the phases: the training step and
    evaluation on top of the runtime, weights and trainable state; the merge after them, on top of the runtime
    alone (the trained model is freed first)."""

    parts: dict[str, float]  # bytes
    total: float
    phase: str  # which phase makes the peak

    @property
    def step_total(self) -> float:
        """The training step's peak alone: runtime, weights, trainable state and the step's activations."""
        return sum(self.parts[k] for k in ("runtime", "weights", "trainable", "activations"))

    def gb(self) -> dict[str, float]:
        return {k: round(v / GB, 2) for k, v in self.parts.items()}

    def __str__(self):
        parts = ", ".join(f"{k} {_gb(v)}" for k, v in self.parts.items() if v >= 0.05 * GB)
        return f"~{_gb(self.total)} GB ({parts}; peak in {self.phase})"


def layer_saved_bytes(shape: ModelShape, s: Setting, length: int) -> float:
    """Bytes autograd saves per token of one layer (no checkpointing), for a sequence padded to `length`."""
    h, q, kv, i = shape.hidden, shape.q_dim, shape.kv_dim, shape.intermediate
    a, t = s.activation_bytes, s.trainable_bytes
    # RMSNorm (Qwen3, Llama) computes in float32 and keeps that copy: the two layer norms, and q/k norms per head
    norms = 4 * (2 * h + ((q + kv) if shape.qk_norm else 0))
    # keys and values are repeated to the query heads (GQA falls back to repeat_kv when a padding mask is given)
    if s.attention == "eager":
        attention = a * 3 * q + (4 + a) * shape.heads * length  # q, k, v; softmax in float32 and its cast
    else:
        attention = a * 4 * q + 4 * shape.heads  # q, k, v, output and the log-sum-exp of flash attention
    if shape.attention_dropout > 0:
        # dropout on the probabilities sends SDPA down its explicit path: probabilities, mask and dropped copy kept
        # (measured on all-MiniLM-L6-v2 in training mode with saved_tensors_hooks: 432 kB a token; counted here: 392 kB)
        attention += 3 * a * shape.heads * length
    mlp = (3 if shape.gated_mlp else 1) * a * i  # gate and up outputs and the activation (BERT: the pre-GELU)
    if s.full_finetune:
        # weight gradients need every projection's input: the norms' outputs (and their casts), the MLP product
        linear_inputs = 2 * 2 * a * h + (a * (q + kv) if shape.qk_norm else 0) + a * i
        return norms + attention + mlp + linear_inputs
    # LoRA (peft): each adapted projection keeps its input cast to the adapter's dtype, dropped out (the CPU's dropout
    # keeps its mask in that dtype too), and the rank-r output of A
    widths = [w for n, (w, _) in shape.projections().items() if s.lora_targets is None or n in s.lora_targets]
    per_input = (2 if s.lora_dropout > 0 else 1) * t
    lora = sum(per_input * w + t * s.lora_r for w in widths)
    return norms + attention + mlp + lora


def _kept_per_token(shape: ModelShape, s: Setting, length: int) -> float:
    """Bytes per token a column keeps until its backward pass: every layer's saved tensors, or with checkpointing
    only each layer's input; plus the embedding output and the final norm."""
    outside = (4 + 2 * s.activation_bytes) * shape.hidden
    per_layer = s.activation_bytes * shape.hidden if s.gradient_checkpointing else layer_saved_bytes(shape, s, length)
    return shape.layers * per_layer + outside


def _backward_extra(shape: ModelShape, s: Setting, rows: int, length: int) -> float:
    """Bytes the backward pass of one column adds on top of what it kept: the layer it recomputes (checkpointing),
    the gradients of one layer's intermediates and the attention kernel's buffers, the 4-D padding mask."""
    layer = layer_saved_bytes(shape, s, length)
    recompute = layer if s.gradient_checkpointing else 0.0
    mask = rows * length * length * (1 if s.attention == "sdpa" else s.activation_bytes)
    return rows * length * (recompute + BACKWARD_WORKSPACE * layer) + mask


def activation_bytes(shape: ModelShape, s: Setting) -> float:
    """Peak bytes of the activations of one training step. A plain loss embeds every column with gradients before
    the backward pass, which then goes through the columns one after the other. A cached loss embeds one mini-batch
    of one column at a time (its left padding stays: a mini-batch has its batch's length), plus the cached
    embeddings and their gradients."""
    if s.cached:
        rows = min(s.mini_batch_size, s.batch_size)
        step = max(rows * n * _kept_per_token(shape, s, n) + _backward_extra(shape, s, rows, n) for n in s.lengths)
        cache = s.batch_size * len(s.lengths) * shape.hidden * 4 * 2
        return ALLOCATOR_OVERHEAD * (step + cache)
    kept = sum(s.batch_size * n * _kept_per_token(shape, s, n) for n in s.lengths)
    return ALLOCATOR_OVERHEAD * (kept + max(_backward_extra(shape, s, s.batch_size, n) for n in s.lengths))


def weight_bytes(shape: ModelShape, s: Setting) -> float:
    if s.quant == "none":
        return shape.n_params * s.weight_bytes
    linear = shape.linear_params
    packed = linear * (0.5 + 4 / 64) if s.quant == "4bit" else linear * (1 + 4 / 4096)  # NF4 + absmax per 64 / int8
    # peft's prepare_model_for_kbit_training casts the rest (embeddings, norms) to float32
    return packed + (shape.n_params - linear) * 4


def estimate(shape: ModelShape, setting: Setting, runtime: float | None = None) -> Estimate:
    """Peak memory of training with `setting`: runtime (what the process holds besides the model: the libraries on a
    CPU, the CUDA context on a GPU; None: the defaults above), weights, trainable state (parameters of LoRA, gradients,
    AdamW's two states), and the largest of: a training step's activations, evaluation's encoding, the merge."""
    s = setting
    if runtime is None:
        runtime = RUNTIME_CPU if s.device == "cpu" else CUDA_CONTEXT
    weights = weight_bytes(shape, s)
    if s.full_finetune:
        trainable = shape.n_params * s.trainable_bytes * 3  # gradient + exp_avg + exp_avg_sq (weights counted above)
    else:
        trainable = (
            shape.lora_params(s.lora_r, list(s.lora_targets) if s.lora_targets else None) * s.trainable_bytes * 4
        )
    step = activation_bytes(shape, s)
    # evaluation encodes without gradients: the residual stream and one layer's intermediates of one batch
    longest = max(s.lengths)
    evaluation = (
        ALLOCATOR_OVERHEAD
        * s.eval_batch_size
        * longest
        * (2 * s.activation_bytes * shape.hidden + 0.5 * layer_saved_bytes(shape, s, longest))
    )
    held = runtime + weights + trainable
    totals = {"training step": held + step, "evaluation": held + evaluation, "merge": merge_bytes(shape, s, runtime)}
    phase = max(totals, key=totals.get)
    parts = {"runtime": runtime, "weights": weights, "trainable": trainable, "activations": step}
    if phase != "training step":
        parts[phase] = totals[phase] - (runtime if phase == "merge" else held)
    return Estimate(parts, totals[phase], phase)


def merge_bytes(shape: ModelShape, s: Setting, runtime: float) -> float:
    """Peak of what follows training (`train.save_outputs`), the trained model freed first: the merge and slerp
    stream one tensor at a time; with merge_with_base="auto" each slerp
    candidate is then loaded alone, in 16-bit on a GPU (the checkpoint's dtype on a CPU), and encodes the dev
    queries and documents without gradients."""
    # on a CPU the process maps the folders it reads (measured: MERGE_SHARE); on a GPU one tensor is there at a
    # time: the largest, the embedding matrix, twice in 16-bit (base and trained), its result, float32 slices
    streamed = MERGE_SHARE * shape.n_params * 2 if s.device == "cpu" else 8 * shape.vocab * shape.hidden
    if not s.merge_choice:
        return runtime + streamed
    candidate = shape.n_params * (2 if s.device != "cpu" else shape.dtype_bytes)
    length, a = max(s.lengths), 2 if s.device != "cpu" else shape.dtype_bytes
    encode = ALLOCATOR_OVERHEAD * s.eval_batch_size * length * (2 * a * shape.hidden + 0.5 * layer_saved_bytes(
        shape, Setting(1, (length,), full_finetune=True, activation_bytes=a), length))  # fmt: skip
    return runtime + max(streamed, candidate + encode)


# ---------------------------------------------------------------------------------------------------------------
# lengths from the data


def _transformer_folder(path: Path) -> Path:
    """The folder of a sentence-transformers model's Transformer module (the model itself for a bare checkpoint)."""
    modules = path / "modules.json"
    if modules.exists():
        for m in json.loads(modules.read_text(encoding="utf-8")):
            if m.get("type", "").endswith("Transformer"):
                return path / m.get("path", "")
    return path


def model_max_length(path: str | Path) -> int | None:
    """The sentence-transformers folder's own max_seq_length, if it sets one."""
    folder = _transformer_folder(Path(path))
    config = folder / "sentence_bert_config.json"
    if config.exists():
        return json.loads(config.read_text(encoding="utf-8")).get("max_seq_length")
    return None


def folder_prompt(path: str | Path, instruction: str | None = None) -> str:
    """The query prompt training will use (as `embtune.encode.query_prompt`), read from the folder, not the model."""
    from .encode import instruct

    if instruction is not None:
        return instruct(instruction) if instruction else ""
    config = Path(path) / "config_sentence_transformers.json"
    if config.exists():
        return (json.loads(config.read_text(encoding="utf-8")).get("prompts") or {}).get("query") or ""
    return ""


def text_columns(dataset) -> list[dict[str, list[str]]]:
    """The text columns of a datasets Dataset, or of each set of a DatasetDict (a batch comes from one set)."""
    from datasets import DatasetDict

    if isinstance(dataset, dict) and not isinstance(dataset, DatasetDict):
        return [dataset]
    sets = list(dataset.values()) if isinstance(dataset, DatasetDict) else [dataset]
    return [{c: d[c] for c in d.column_names} for d in sets]


def padded_lengths(path: str | Path, dataset, max_seq_length: int,
                   prompts: dict[str, str] | None = None, sample: int = 2000, seed: int = 0,
                   tokenizer=None) -> tuple[int, ...]:  # fmt: skip
    """Tokens per column of the longest batch, as padding makes them: the longest text of each column (of a seeded
    sample of `sample` rows), with its prompt (`prompts`: column -> prompt, e.g. the anchors' query instruction),
    capped by `max_seq_length` and the model's own limit. With several sets (DatasetDict), the set whose batch is
    longest in all. `dataset`: a Dataset, a DatasetDict, or {column: [texts]}."""
    from transformers import AutoTokenizer

    tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(_transformer_folder(Path(path))))
    cap = min(max_seq_length, model_max_length(path) or max_seq_length)
    prompts = prompts or {}
    best: tuple[int, ...] = ()
    for columns in text_columns(dataset):
        n = len(next(iter(columns.values())))
        rows = random.Random(seed).sample(range(n), min(n, sample))
        lengths = []
        for name, texts in columns.items():
            batch = [prompts.get(name, "") + texts[r] for r in rows]
            ids = tokenizer(batch, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
            lengths.append(min(cap, max(len(x) for x in ids) + 1))  # + 1: the end token prepare() may append
        if sum(lengths) > sum(best):
            best = tuple(lengths)
    return best


M_MMAP_THRESHOLD = -3  # glibc's mallopt option (malloc.h)


def return_freed_blocks(threshold: int = 2**20) -> bool:
    """Have glibc map blocks of `threshold` bytes and more on their own, so that freeing one hands it back to the OS.
    By default glibc raises that threshold, up to 32 MB, each time a large block is freed, and the smaller blocks
    stay in its heap once freed, resident wherever a live block sits above them. The cached losses embed in
    mini-batches whose activations are such blocks: on Qwen3-Embedding-0.6B's shape (mini-batch 8, checkpointing)
    the step peaked 1.3 GB above the estimate of what it holds (bench/memory_plan.py). Process-wide; False where the
    C library has no mallopt (not glibc)."""
    import ctypes
    import ctypes.util

    try:
        return bool(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


# ---------------------------------------------------------------------------------------------------------------
# what there is, and the decision


# (limit, usage) of this process's cgroup, v2 then v1: the first one readable decides
CGROUP_FILES = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def available_memory(device: str = "cpu") -> tuple[float, float]:
    """(bytes this process may still grow by, bytes it holds now). CPU: free RAM (psutil's `available`), within a
    cgroup's limit when there is one (containers, Colab); the process's resident memory. GPU: free device memory
    (`torch.cuda.mem_get_info`) within this process's cap, when `torch.cuda.set_per_process_memory_fraction` set one
    (a shared card; the GPU check's T4 rehearsal), and what torch has reserved."""
    if device != "cpu":
        import torch

        free, total = torch.cuda.mem_get_info()
        reserved = torch.cuda.memory_reserved()
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda: 1.0)()
        return float(min(free, fraction * total - reserved)), float(reserved)
    import psutil

    available = float(psutil.virtual_memory().available)
    for limit_file, usage_file in CGROUP_FILES:
        try:
            limit = Path(limit_file).read_text().strip()
            if limit != "max":  # cgroup v1 writes its "no limit" as a huge number, which min() leaves aside
                available = min(available, int(limit) - int(Path(usage_file).read_text()))
            break
        except (OSError, ValueError):
            continue
    return available, float(psutil.Process().memory_info().rss)


@dataclass
class MemoryRequest:
    """What the user asked for; None (and loss "auto") leave the choice to the plan."""

    loss: str = "auto"  # auto: qwen3, or cached_qwen3 when memory needs it | any name of embtune.losses.LOSSES
    gradient_checkpointing: bool | None = None
    mini_batch_size: int | None = None
    default_loss: str = "qwen3"  # what "auto" means when memory allows


@dataclass
class MemoryPlan:
    """The estimate, the memory available, and the settings chosen."""

    estimate: Estimate
    available: float  # bytes the process may still grow by
    resident: float  # bytes it holds now
    gradient_checkpointing: bool
    loss: str
    mini_batch_size: int | None
    batch_size: int
    lengths: tuple[int, ...]
    device: str = "cpu"
    changed: list[str] = field(default_factory=list)  # what the plan turned on, in order

    @property
    def budget(self) -> float:
        return self.resident + HEADROOM * self.available

    def apply(self, config):
        """A copy of a TrainConfig (any dataclass with these fields) with the chosen settings."""
        values = {"gradient_checkpointing": self.gradient_checkpointing, "loss": self.loss}
        if self.mini_batch_size is not None:
            values["mini_batch_size"] = self.mini_batch_size
        names = {f.name for f in dataclasses.fields(config)}
        return dataclasses.replace(config, **{k: v for k, v in values.items() if k in names})

    def __str__(self):
        where = "RAM" if self.device == "cpu" else "GPU memory"
        mini = f" (mini-batch {self.mini_batch_size})" if self.mini_batch_size else ""
        why = f" | turned on: {', '.join(self.changed)}" if self.changed else ""
        return (
            f"memory: needs {self.estimate} of {_gb(self.budget)} GB ({HEADROOM:.0%} of {_gb(self.available)} "
            f"GB free {where} + {_gb(self.resident)} GB held) | batch {self.batch_size} x "
            f"{'+'.join(map(str, self.lengths))} tokens | gradient checkpointing "
            f"{'on' if self.gradient_checkpointing else 'off'} | loss {self.loss}{mini}{why}"
        )


def _gb(x: float) -> str:
    return f"{x / GB:.1f}" if x >= 0.95 * GB else f"{x / GB:.2f}"


def _mini_batches(batch_size: int) -> list[int]:
    """Mini-batch sizes to try, largest first: powers of two below the batch."""
    sizes, m = [], 1
    while m < batch_size:
        sizes.append(m)
        m *= 2
    return sorted(sizes, reverse=True)


def decide(shape: ModelShape, base: Setting, request: MemoryRequest, available: float, resident: float,
           runtime: float | None = None) -> MemoryPlan:  # fmt: skip
    """The settings that fit `resident + HEADROOM * available` bytes. The user's explicit choices are kept; open
    ones are decided in this order: as asked (checkpointing off), gradient checkpointing on,
    then the cached loss (GradCache) with the largest mini-batch that fits. If none fits, NotEnoughMemory names the
    nearest settings that would."""
    budget = resident + HEADROOM * available
    runtime = resident if runtime is None else runtime
    after = merge_bytes(shape, base, runtime)
    if after > budget:  # no training setting changes it: say so before training, not after
        where = "RAM" if base.device == "cpu" else "GPU memory"
        what = ("choosing what ships (merge_with_base='auto') loads one slerp candidate in 16-bit"
                if base.merge_choice else "merging the adapter streams the model's tensors")  # fmt: skip
        fix = ": set merge_with_base=1.0 to ship the model as trained without scoring candidates" * base.merge_choice
        raise NotEnoughMemory(f"after training, {what}: ~{_gb(after)} GB, {_gb(budget)} GB {where} to use "
                              f"({HEADROOM:.0%} of {_gb(available)} GB free + {_gb(resident)} GB held){fix}")
    loss = request.default_loss if request.loss == "auto" else request.loss
    cached_name = loss if loss.startswith("cached_") else CACHED.get(loss)
    # Off unless asked or needed, on a GPU as on a CPU: checkpointing costs a third more compute for memory that a
    # model which fits does not need (Qwen3-Embedding-0.6B on an H100, say).
    ckpt = bool(request.gradient_checkpointing)
    final_ckpt = True if request.gradient_checkpointing is None else request.gradient_checkpointing
    choose_mini = request.mini_batch_size is None
    sizes = _mini_batches(base.batch_size) if choose_mini else [request.mini_batch_size]
    candidates = []  # (checkpointing, loss, mini-batch, what the plan turned on)
    if not loss.startswith("cached_"):
        candidates.append((ckpt, loss, None, []))
        if final_ckpt != ckpt:
            candidates.append((True, loss, None, ["gradient checkpointing"]))
        if request.loss == "auto" and cached_name:
            turned = ["gradient checkpointing"] if final_ckpt != ckpt else []
            candidates += [(final_ckpt, cached_name, m, [*turned, f"{cached_name} (mini-batch {m})"]) for m in sizes]
    else:
        candidates += [(ckpt, loss, m, [f"mini-batch {m}"] if choose_mini else []) for m in sizes]
        if final_ckpt != ckpt:
            candidates += [(True, loss, m, ["gradient checkpointing"] + ([f"mini-batch {m}"] if choose_mini else []))
                           for m in sizes]  # fmt: skip
    needed = None
    for checkpointing, name, mini, changed in candidates:
        est = estimate(shape, dataclasses.replace(base, gradient_checkpointing=checkpointing, mini_batch_size=mini),
                       runtime)  # fmt: skip
        needed = est if needed is None or est.total < needed.total else needed
        if est.total <= budget:
            return MemoryPlan(est, available, resident, checkpointing, name, mini, base.batch_size, base.lengths,
                              base.device, changed)  # fmt: skip
    raise NotEnoughMemory(_what_fits(shape, base, request, budget, available, resident, runtime, needed, cached_name,
                                     final_ckpt))  # fmt: skip


def _what_fits(shape, base: Setting, request: MemoryRequest, budget, available, resident, runtime, needed: Estimate,
               cached_name, ckpt) -> str:  # fmt: skip
    """One line: what the smallest setting left to the plan needs, what there is, and the nearest settings that
    would fit (each changing one thing)."""
    cache_ok = cached_name and (request.loss == "auto" or str(request.loss).startswith("cached_"))
    mini = (request.mini_batch_size or 1) if cache_ok else None

    def fits(**changes) -> bool:
        setting = dataclasses.replace(base, **{"gradient_checkpointing": ckpt, "mini_batch_size": mini, **changes})
        return estimate(shape, setting, runtime).total <= budget

    tries = []
    if not ckpt and fits(gradient_checkpointing=True):
        tries.append("gradient_checkpointing=True")
    if not cache_ok and cached_name and fits(mini_batch_size=1):
        tries.append(f"loss={cached_name!r}")
    b = base.batch_size // 2
    while b >= 1 and not fits(batch_size=b):  # a mini-batch above the batch is the batch (activation_bytes)
        b //= 2
    if b >= 1:
        tries.append(f"batch_size={b}")
    n = 2 ** ((max(base.lengths) - 1).bit_length() - 1)  # the power of two below the longest column
    while n >= 16 and not fits(lengths=tuple(min(x, n) for x in base.lengths)):
        n //= 2
    if n >= 16:
        tries.append(f"max_seq_length={n}")
    # 4-bit on a CPU computes and trains in float32 (setting_for), whatever the checkpoint's dtype
    if not base.full_finetune and base.quant == "none" and base.device == "cpu" and fits(
            quant="4bit", activation_bytes=4, trainable_bytes=4):  # fmt: skip
        tries.append('quant="4bit"')
    if base.device == "cpu":
        tries.append("a GPU")
    where = "RAM" if base.device == "cpu" else "GPU memory"
    return (f"training needs ~{_gb(needed.total)} GB, {_gb(budget)} GB {where} to use "
            f"({HEADROOM:.0%} of {_gb(available)} GB free + {_gb(resident)} GB held): "
            f"try {', or '.join(tries) if tries else 'a smaller model'}")  # fmt: skip


def setting_for(shape: ModelShape, lora_plan, batch_size: int, lengths: tuple[int, ...], options=None,
                device: str | None = None) -> Setting:  # fmt: skip
    """The Setting that `embtune.lora`'s plan (and the options it was made from: lora_r, target_modules,
    lora_dropout) will load: the dtype transformers loads the weights in (the checkpoint's unless the plan asks for
    one), activations in the weights' dtype or the mixed precision's, LoRA's trainable dtype."""
    from .lora import loader_dtype

    device = device or ("cpu" if lora_plan.precision == "fp32" else "cuda")
    quant = lora_plan.quant
    if quant != "none":
        weight = activation = trainable = 4 if device == "cpu" else 2
    else:
        asked = loader_dtype(lora_plan)
        weight = DTYPE_BYTES[str(asked).removeprefix("torch.")] if asked else shape.dtype_bytes
        activation = 2 if lora_plan.precision in ("bf16", "fp16") else weight
        trainable = weight
    targets = tuple(getattr(options, "target_modules", None) or ()) or None  # None: every projection
    return Setting(
        batch_size=batch_size,
        lengths=tuple(lengths),
        full_finetune=lora_plan.full_finetune,
        quant=quant,
        weight_bytes=weight,
        activation_bytes=activation,
        trainable_bytes=trainable,
        lora_r=lora_plan.lora_r,
        lora_targets=targets,
        lora_dropout=getattr(options, "lora_dropout", 0.05),
        device=device,
    )


def plan_memory(config, path: str | Path, lora_plan, dataset, prompts: dict[str, str] | None = None,
                available: float | None = None, resident: float | None = None, runtime: float | None = None,
                shape: ModelShape | None = None, loss: str | None = None) -> MemoryPlan:  # fmt: skip
    """The memory plan for a TrainConfig `config` (batch_size, max_seq_length, gradient_checkpointing, loss,
    mini_batch_size, instruction, merge_with_base, lora_r, lora_dropout, target_modules) on the model at `path`, planned
    by `embtune.lora.plan` (`lora_plan`), and the training `dataset`. `available`/`resident` (bytes) default to this
    machine's; `runtime` to the process's resident memory (at least RUNTIME_CPU on a CPU). `loss`: overrides config.loss
    ("auto": the plan may switch qwen3 to cached_qwen3). Call it before loading any weight; raises NotEnoughMemory."""
    device = "cpu" if lora_plan.precision == "fp32" else "cuda"
    shape = shape or ModelShape.from_config(_transformer_folder(Path(path)), n_params=lora_plan.n_params)
    if prompts is None:
        prompts = {"anchor": folder_prompt(path, config.instruction)}
    lengths = padded_lengths(path, dataset, config.max_seq_length, prompts)
    if available is None or resident is None:
        free, held = available_memory(device)
        available = free if available is None else available
        resident = held if resident is None else resident
    if runtime is None:
        runtime = max(resident, RUNTIME_CPU) if device == "cpu" else resident + CUDA_CONTEXT * (resident == 0)
    request = MemoryRequest(loss=loss or config.loss, gradient_checkpointing=config.gradient_checkpointing,
                            mini_batch_size=config.mini_batch_size)  # fmt: skip
    base = dataclasses.replace(setting_for(shape, lora_plan, config.batch_size, lengths, config, device),
                               merge_choice=config.merge_with_base == "auto")  # fmt: skip
    return decide(shape, base, request, available, resident, runtime)
