"""How a model is loaded for training, for the embedder (notebook 03) and the reranker (notebook 06) alike:
backend (unsloth or sentence-transformers + peft), quantisation (bitsandbytes), LoRA or full fine-tuning, mixed
precision and gradient checkpointing.

`plan` decides all of it from the model's config and the device, before any weight is loaded; the loaders carry
the plan out and the plan's one line says what is in effect and why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from .config import POSITIVE, at_least, between, check_options, one_of

QWEN_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMALL_MODEL_PARAMS = 300_000_000  # below this, full fine-tuning fits anywhere and LoRA only costs quality
BACKENDS = ("auto", "unsloth", "peft")
QUANTS = ("auto", "4bit", "8bit", "none")


@dataclass(kw_only=True)
class LoraOptions:
    """The knobs of `plan`, shared by TrainConfig and RerankConfig."""

    backend: str = "auto"  # auto (unsloth on a CUDA GPU when installed) | unsloth | peft
    quant: str = "auto"  # auto (4bit for LoRA on a CUDA GPU, else none) | 4bit | 8bit | none
    full_finetune: bool | None = None  # None: full below 300M parameters, LoRA above
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(QWEN_TARGET_MODULES))
    gradient_checkpointing: bool | None = None  # None: the embedder's memory plan decides; else on with a GPU

    RULES = {"backend": one_of(*BACKENDS), "quant": one_of(*QUANTS),
             "lora_r": at_least(1), "lora_alpha": POSITIVE, "lora_dropout": between(0, 1, high_open=True)}

    def __post_init__(self):  # alone (the benchmarks); inside a step's config, StepConfig's check comes first
        check_options(self)


@dataclass
class Plan:
    """What `load_*_for_training` does on this machine, and why."""

    backend: str  # "unsloth" | "peft"
    quant: str  # "4bit" | "8bit" | "none"
    full_finetune: bool
    precision: str  # the Trainer's mixed precision: "bf16" | "fp16" | "fp32" (none)
    gradient_checkpointing: bool
    n_params: int  # counted from the config: the unpacked size, also for a 4-bit model
    why: str
    lora_r: int = 16
    # read off the loaded model (`finish`): what is in effect, not what was asked for
    trainable: int | None = None
    trainable_dtype: str | None = None

    def trainer_args(self) -> dict:
        """The mixed-precision flags of transformers' TrainingArguments."""
        return {"bf16": self.precision == "bf16", "fp16": self.precision == "fp16"}

    def __str__(self):
        backend = "unsloth" if self.backend == "unsloth" else "sentence-transformers + peft"
        mode = "full fine-tuning" if self.full_finetune else f"LoRA r={self.lora_r}"
        trainable = f"{self.trainable:,} of " if self.trainable is not None else ""
        weights = f" ({self.trainable_dtype} weights)" if self.trainable_dtype else ""
        return (
            f"{backend} | {self.quant} | {mode} | {trainable}{self.n_params:,} parameters trainable{weights} | "
            f"mixed precision {self.precision} | gradient checkpointing "
            f"{'on' if self.gradient_checkpointing else 'off'} | why: {self.why}"
        )


def count_params(path: str) -> int:
    """The model's parameter count from its config alone, on the meta device (no memory, no weights read)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel

    with init_empty_weights():
        model = AutoModel.from_config(AutoConfig.from_pretrained(path))
    return sum(p.numel() for p in model.parameters())


def precision(capability: tuple[int, int] | None) -> str:
    """Mixed precision for a CUDA compute capability (None: the CPU). bf16 needs sm 8.0 (Ampere); older cards
    such as the T4 (7.5) train in fp16 with a gradient scaler; the CPU in fp32. Asking torch instead is unreliable:
    it reports emulated bf16 as supported, and after unsloth is imported it reports False on a T4."""
    if capability is None:
        return "fp32"
    return "bf16" if capability >= (8, 0) else "fp16"


def compute_dtype(plan: Plan) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[plan.precision]


def cuda_capability() -> tuple[int, int] | None:
    """The GPU's compute capability; EMBTUNE_CUDA_CAPABILITY (e.g. "7.5") plans as for that card instead, which
    is how the GPU check rehearses a T4 (fp16 and a gradient scaler) on a newer one."""
    if not torch.cuda.is_available():
        return None
    forced = os.environ.get("EMBTUNE_CUDA_CAPABILITY")
    return tuple(int(x) for x in forced.split(".")) if forced else torch.cuda.get_device_capability(0)


def unsloth_problem() -> str | None:
    """None when unsloth imports here, else why not."""
    try:
        import unsloth  # noqa: F401
    except Exception as e:  # unsloth raises more than ImportError when it cannot patch
        return f"unsloth unavailable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def plan(options: LoraOptions, path: str, kind: str = "embedder", n_params: int | None = None,
         capability: tuple[int, int] | None | str = "detect") -> Plan:  # fmt: skip
    """Small models (< 300M parameters) are fully fine-tuned unquantised; larger ones get LoRA, 4-bit on a GPU.
    `kind`: "embedder", or a reranker's "causal_lm" or "cross_encoder". unsloth on a CUDA GPU (FastSentenceTransformer
    for the embedder, FastLanguageModel for a causal-LM reranker, which also runs in unsloth's CPU fallback when
    forced), sentence-transformers + peft elsewhere and for cross-encoders."""
    capability = cuda_capability() if capability == "detect" else capability
    n_params = n_params if n_params is not None else count_params(path)
    full = options.full_finetune if options.full_finetune is not None else n_params < SMALL_MODEL_PARAMS
    quant = options.quant
    if quant == "auto":
        quant = "4bit" if capability is not None and not full else "none"
    if full and quant != "none":
        raise ValueError("full fine-tuning needs quant='none' (quantised weights cannot be trained)")
    gpu = f"CUDA GPU (sm {capability[0]}.{capability[1]})" if capability else "no CUDA GPU"
    if options.backend == "peft":
        backend, why = "peft", f"backend='peft' asked for; {gpu}"
    elif options.backend == "unsloth":
        if kind == "cross_encoder":
            raise ValueError(f"{path} is a cross-encoder; unsloth trains causal LMs only: set backend='peft'")
        if capability is None and kind == "embedder":
            raise ValueError("backend='unsloth' needs a CUDA GPU for an embedder (FastSentenceTransformer); "
                             "set backend='auto' or 'peft' on this machine")  # fmt: skip
        problem = unsloth_problem()
        if problem:
            raise ValueError(f"backend='unsloth': {problem}; set backend='auto' or 'peft'")
        backend, why = "unsloth", f"backend='unsloth' asked for; {gpu}"
    elif capability is None:
        backend, why = "peft", "no CUDA GPU: unsloth's fast path needs one"
    elif kind == "cross_encoder":
        backend, why = "peft", f"{gpu}; unsloth trains causal LMs, not cross-encoders"
    else:
        # (a capability given without a device, as the tests do, plans for that card without importing unsloth)
        problem = unsloth_problem() if torch.cuda.is_available() else "no CUDA device in this process"
        backend, why = ("peft", problem) if problem else ("unsloth", gpu)
    # None: on with a GPU. The embedder never gets here with None: its memory plan (embtune.memory) decides first,
    # on only where the model would not fit without it; the reranker has no memory plan yet.
    checkpointing = options.gradient_checkpointing
    if checkpointing is None:
        checkpointing = capability is not None
    return Plan(backend, quant, full, precision(capability), checkpointing, n_params, why, options.lora_r)


def loader_dtype(plan: Plan) -> torch.dtype | None:
    """The dtype unquantised weights are loaded in, by either backend (None: the checkpoint's): float32 master
    weights for full fine-tuning, whose AdamW updates would round away in 16 bits (unsloth's default, and
    transformers' for a bf16 checkpoint such as Qwen3's, load 16-bit ones); frozen 16-bit weights for LoRA on a
    GPU."""
    if plan.full_finetune:
        return torch.float32
    return None if plan.precision == "fp32" else compute_dtype(plan)


def quantization_kwargs(plan: Plan) -> dict:
    """transformers `model_kwargs`: bitsandbytes 4-bit (NF4) or 8-bit weights, computing in the plan's precision;
    else the weights in `loader_dtype`."""
    if plan.quant == "none":
        dtype = loader_dtype(plan)
        return {"dtype": dtype} if dtype else {}
    from transformers import BitsAndBytesConfig

    quantized = {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=plan.quant == "4bit",
            load_in_8bit=plan.quant == "8bit",
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute_dtype(plan),
        )
    }
    if torch.cuda.is_available():  # quantised weights are placed as they load, not moved afterwards
        quantized["device_map"] = {"": torch.cuda.current_device()}
    return quantized


def unsloth_kwargs(plan: Plan, max_seq_length: int) -> dict:
    """unsloth's `from_pretrained` arguments for the plan: fp32 master weights for full fine-tuning (unsloth's own
    default loads 16-bit ones), and gradient checkpointing asked for at load time, which is the only place its
    full fine-tuning path reads it."""
    return {
        "max_seq_length": max_seq_length,
        "load_in_4bit": plan.quant == "4bit",
        "load_in_8bit": plan.quant == "8bit",
        "load_in_16bit": plan.quant == "none" and not plan.full_finetune,
        "dtype": loader_dtype(plan),
        "full_finetuning": plan.full_finetune,
        "use_gradient_checkpointing": "unsloth" if plan.gradient_checkpointing else False,
    }


def target_modules(module: torch.nn.Module, wanted: list[str]) -> list[str] | str:
    """The requested projection names that the model has; "all-linear" when it has none (e.g. BERT)."""
    names = {n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}
    present = [w for w in wanted if w in names]
    return present or "all-linear"


def keep_4bit_differentiable(model) -> None:
    """bitsandbytes (0.50) repacks 4-bit weights for its AVX512-BF16 CPU kernel on the first no-grad eval
    forward (e.g. a dev evaluation) and keeps using that kernel afterwards, which has no autograd: every
    gradient below that layer is then silently wrong. Training on the CPU must never take that path."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def add_peft_lora(model, inner: torch.nn.Module, options: LoraOptions, plan: Plan) -> None:
    """LoRA through sentence-transformers' own adapter support (SentenceTransformer and CrossEncoder alike), so
    checkpoints and saves hold the adapter only."""
    from peft import LoraConfig, prepare_model_for_kbit_training

    if plan.quant != "none":
        keep_4bit_differentiable(inner)
        prepare_model_for_kbit_training(inner, use_gradient_checkpointing=plan.gradient_checkpointing)
    targets = target_modules(inner, options.target_modules)
    model.add_adapter(LoraConfig(r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                                 target_modules=targets, bias="none"))  # fmt: skip


def finish(model, plan: Plan) -> Plan:
    """The plan as the loaded model carries it out: trainable parameters, their dtype, gradient checkpointing."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    plan.trainable = sum(p.numel() for p in trainable)
    plan.trainable_dtype = str(trainable[0].dtype).removeprefix("torch.") if trainable else None
    inner = getattr(model[0], "auto_model", None) or model[0].model
    plan.gradient_checkpointing = bool(getattr(inner, "is_gradient_checkpointing", plan.gradient_checkpointing))
    return plan


def load_embedder_for_training(path: str, options: LoraOptions, plan: Plan, max_seq_length: int, seed: int = 42):
    """A SentenceTransformer ready to train as planned (left padding and end token for last-token pooling)."""
    from sentence_transformers import SentenceTransformer

    from .encode import prepare

    if plan.backend == "unsloth":
        from unsloth import FastSentenceTransformer

        model = FastSentenceTransformer.from_pretrained(path, **unsloth_kwargs(plan, max_seq_length))
    else:
        model = SentenceTransformer(path, model_kwargs=quantization_kwargs(plan), trust_remote_code=False)
    # Positions past the model's trained length are untrained, and attention memory grows with its square.
    model.max_seq_length = min(model.max_seq_length or max_seq_length, max_seq_length)
    prepare(model)
    inner = model[0].auto_model
    if not plan.full_finetune:
        if plan.backend == "unsloth":
            model = FastSentenceTransformer.get_peft_model(
                model, r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                target_modules=target_modules(inner, options.target_modules),
                use_gradient_checkpointing="unsloth" if plan.gradient_checkpointing else False, random_state=seed,
            )  # fmt: skip
        else:
            add_peft_lora(model, inner, options, plan)
    # unsloth applies its checkpointing inside get_peft_model only; for full fine-tuning its from_pretrained just
    # turns torch.compile off (unsloth 2026.10.9, FastSentenceTransformer.from_pretrained): enabled here then.
    if plan.gradient_checkpointing and (plan.backend == "peft" or plan.full_finetune):
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def load_reranker_for_training(path: str, options: LoraOptions, plan: Plan, max_length: int, seed: int = 42):
    """A CrossEncoder ready to train as planned. With unsloth, its FastLanguageModel loads (and LoRA-wraps) the
    causal LM inside a CrossEncoder built on the meta device, so the weights are read once."""
    from .rerank import load_reranker

    if plan.backend != "unsloth":
        model = load_reranker(path, max_length=max_length, model_kwargs=quantization_kwargs(plan))
        if not plan.full_finetune:
            add_peft_lora(model, model[0].model, options, plan)
        if plan.gradient_checkpointing:
            model[0].model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model
    from unsloth import FastLanguageModel

    lm, _ = FastLanguageModel.from_pretrained(path, **unsloth_kwargs(plan, max_length))
    if not plan.full_finetune:
        lm = FastLanguageModel.get_peft_model(
            lm, r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
            target_modules=target_modules(lm, options.target_modules),
            use_gradient_checkpointing="unsloth" if plan.gradient_checkpointing else False, random_state=seed,
        )  # fmt: skip
    elif plan.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # as above
    model = load_reranker(path, max_length=max_length, model_kwargs={"device_map": "meta"})
    model[0].model = lm
    return model
