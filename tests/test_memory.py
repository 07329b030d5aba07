"""The memory plan (embtune.memory): its arithmetic, and its choices on the tiny fixture under a small budget."""

import dataclasses
import subprocess
import sys

import pytest
import torch

from embtune import memory
from embtune.lora import count_params, plan
from embtune.memory import (
    HEADROOM,
    MemoryRequest,
    ModelShape,
    NotEnoughMemory,
    Setting,
    decide,
    estimate,
    layer_saved_bytes,
    padded_lengths,
    plan_memory,
)
from embtune.train import TrainConfig

ROWS = {
    "anchor": [f"how do I use feature {i} of the module" for i in range(40)],
    "positive": [
        f"the module offers many features, and this is how number {i} works. " * (1 + i % 5) for i in range(40)
    ],  # fmt: skip
}
RUNTIME = 1e6  # fixed and small, so that the budgets below depend on the model, not on this process's memory


def config(tiny_embedding, **overrides):
    values = dict(base_model=str(tiny_embedding), data_dir="-", run_dir="-", batch_size=32, max_seq_length=64,
                  full_finetune=False, gradient_checkpointing=None, mini_batch_size=None)  # fmt: skip
    return TrainConfig(**{**values, **overrides})


def planned(tiny_embedding, available, **overrides):
    """The plan for the tiny fixture with `available` bytes (nothing held), loss left to the plan."""
    c = config(tiny_embedding, **overrides)
    how = plan(c, str(tiny_embedding), capability=None)
    loss = overrides.get("loss", "auto")
    return plan_memory(c, tiny_embedding, how, ROWS, available=available, resident=0, runtime=RUNTIME, loss=loss)


def need(tiny_embedding, checkpointing, mini=None):
    """What the estimate says one setting of the tiny fixture needs."""
    c = config(tiny_embedding)
    how = plan(c, str(tiny_embedding), capability=None)
    shape = ModelShape.from_config(tiny_embedding, n_params=how.n_params)
    lengths = padded_lengths(tiny_embedding, ROWS, 32, 64, {"anchor": memory.folder_prompt(tiny_embedding)})
    s = dataclasses.replace(memory.setting_for(shape, how, 32, lengths, c, "cpu"), gradient_checkpointing=checkpointing,
                            mini_batch_size=mini)  # fmt: skip
    return estimate(shape, s, RUNTIME).total


def available_for(total):
    """The free memory that makes a budget of exactly `total` bytes."""
    return total / HEADROOM * 1.0001


def test_a_budget_that_fits_as_asked_changes_nothing(tiny_embedding):
    p = planned(tiny_embedding, available_for(need(tiny_embedding, False)))
    assert (p.gradient_checkpointing, p.loss, p.mini_batch_size, p.changed) == (False, "qwen3", None, [])
    line = str(p)
    assert "\n" not in line and "gradient checkpointing off" in line and "loss qwen3" in line


def test_a_smaller_budget_turns_on_gradient_checkpointing(tiny_embedding):
    with_checkpointing = need(tiny_embedding, True)
    assert with_checkpointing < need(tiny_embedding, False)
    p = planned(tiny_embedding, available_for(with_checkpointing))
    assert (p.gradient_checkpointing, p.loss, p.mini_batch_size) == (True, "qwen3", None)
    assert p.changed == ["gradient checkpointing"]


def test_a_smaller_budget_takes_the_cached_loss_with_the_largest_mini_batch_that_fits(tiny_embedding):
    budget = (need(tiny_embedding, True, 8) + need(tiny_embedding, True, 16)) / 2
    p = planned(tiny_embedding, available_for(budget))
    assert (p.gradient_checkpointing, p.loss, p.mini_batch_size) == (True, "cached_qwen3", 8)
    assert p.estimate.total <= budget
    assert p.apply(config(tiny_embedding)).loss == "cached_qwen3"
    assert p.apply(config(tiny_embedding)).mini_batch_size == 8
    # an explicit loss is kept: the error names its cached twin
    with pytest.raises(NotEnoughMemory, match="loss='cached_mnrl'"):
        planned(tiny_embedding, available_for(budget), loss="mnrl")


def test_a_tiny_budget_raises_one_line_naming_what_would_fit(tiny_embedding):
    smallest = need(tiny_embedding, True, 1)
    with pytest.raises(NotEnoughMemory) as raised:
        planned(tiny_embedding, available_for(smallest * 0.98))
    message = str(raised.value)
    assert "\n" not in message
    assert "needs ~" in message and "GB" in message
    assert "batch_size=" in message or "max_seq_length=" in message
    assert "a GPU" in message


def test_explicit_choices_are_kept(tiny_embedding):
    # asked for checkpointing: kept even when everything fits without it
    p = planned(tiny_embedding, 1e12, gradient_checkpointing=True)
    assert p.gradient_checkpointing is True and p.changed == []
    # asked for no checkpointing and a plain loss: not overridden; the error names what would fit
    with pytest.raises(NotEnoughMemory, match="gradient_checkpointing=True"):
        planned(tiny_embedding, available_for(need(tiny_embedding, True)), gradient_checkpointing=False, loss="qwen3")
    # asked for the cached loss with a mini-batch: both kept
    p = planned(tiny_embedding, 1e12, loss="cached_qwen3", mini_batch_size=2)
    assert (p.loss, p.mini_batch_size, p.gradient_checkpointing) == ("cached_qwen3", 2, False)


def test_the_estimate_adds_up_by_hand():
    """Qwen3-shaped: 2 layers, hidden 64, 4 query heads and 2 key-value heads of 16, intermediate 128, vocabulary
    1,000; float32; LoRA r=16 on the 7 projections, dropout 0.05."""
    shape = ModelShape(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, vocab=1000,
                       n_params=100_000, dtype_bytes=4)  # fmt: skip
    s = Setting(batch_size=8, lengths=(10, 20), weight_bytes=4, activation_bytes=4, trainable_bytes=4, lora_r=16)
    # LoRA: r x (in + out) per projection: q 64+64, k 64+32, v 64+32, o 64+64, gate/up 64+128, down 128+64
    lora = 2 * 16 * (128 + 96 + 96 + 128 + 192 + 192 + 192)
    assert shape.lora_params(16) == lora == 32_768
    e = estimate(shape, s, runtime=1e9)
    assert e.parts["weights"] == 100_000 * 4
    assert e.parts["trainable"] == lora * 4 * 4  # parameter, gradient, AdamW's two states, float32
    # saved per token of one layer: float32 norm inputs 4 x (2*64 + 64 + 32); q, k, v, output 4 x 4 x 64 and the
    # log-sum-exp 4 x 4; MLP 3 x 4 x 128; LoRA 2 x 4 x (5*64 + 64 + 128) + 7 x 4 x 16
    assert layer_saved_bytes(shape, s, 20) == 896 + 1040 + 1536 + 4544
    assert e.total == 1e9 + e.parts["weights"] + e.parts["trainable"] + e.parts["activations"]
    # activations of a plain loss: every column kept until the backward pass, per token 2 layers of 8,016 bytes
    # plus the embedding output and final norm (4 + 2 x 4) x 64 = 768; then the backward's extra for the longest
    # column: 8 x 20 tokens x half a layer, and the padding mask 8 x 20 x 20; all x 1.1 for the allocator
    kept = 8 * (10 + 20) * (2 * 8016 + 768)
    assert e.parts["activations"] == pytest.approx(1.1 * (kept + 8 * 20 * 4008 + 8 * 20 * 20))
    # with checkpointing: each layer keeps only its input (4 x 64 bytes a token); the backward recomputes a layer
    ckpt = estimate(shape, dataclasses.replace(s, gradient_checkpointing=True), runtime=1e9)
    kept = 8 * (10 + 20) * (2 * 256 + 768)
    assert ckpt.parts["activations"] == pytest.approx(1.1 * (kept + 8 * 20 * (8016 + 4008) + 8 * 20 * 20))
    four_bit = estimate(shape, dataclasses.replace(s, quant="4bit"), runtime=0)
    linear = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128)
    assert shape.linear_params == linear
    assert four_bit.parts["weights"] == pytest.approx(linear * (0.5 + 4 / 64) + (100_000 - linear) * 4)


def test_the_shape_is_read_from_the_config(tiny_embedding):
    shape = ModelShape.from_config(tiny_embedding)
    assert (shape.layers, shape.hidden, shape.intermediate, shape.heads, shape.kv_heads, shape.head_dim) == (
        2, 64, 128, 4, 2, 16)  # fmt: skip
    assert shape.n_params == count_params(str(tiny_embedding))
    assert shape.n_params - shape.linear_params == shape.vocab * shape.hidden + (2 * 2 + 1) * 64 + 2 * 2 * 16


def test_padded_lengths_are_the_longest_batch_of_the_data(tiny_embedding):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_embedding))
    prompt = memory.folder_prompt(tiny_embedding)
    assert prompt.startswith("Instruct: ")
    longest = {c: max(len(tokenizer(prompt * (c == "anchor") + t)["input_ids"]) for t in ts) for c, ts in ROWS.items()}
    assert padded_lengths(tiny_embedding, ROWS, 32, 512, {"anchor": prompt}) == (
        longest["anchor"] + 1, longest["positive"] + 1)  # fmt: skip
    assert padded_lengths(tiny_embedding, ROWS, 32, 16, {"anchor": prompt}) == (16, 16), "capped"
    # notebook 02's rows come as a DatasetDict of sets with different columns: the longest set's batch counts
    from datasets import Dataset, DatasetDict

    sets = DatasetDict({"pairs": Dataset.from_dict(ROWS),
                        "hard_negatives": Dataset.from_dict({**ROWS, "negative_1": ROWS["positive"]})})  # fmt: skip
    assert padded_lengths(tiny_embedding, sets, 32, 512, {"anchor": prompt}) == (
        longest["anchor"] + 1, longest["positive"] + 1, longest["positive"] + 1)  # fmt: skip


def test_saved_activations_match_autograd(tiny_embedding):
    """The per-layer count against what autograd really saves in the tiny Qwen3's second layer (LoRA, float32)."""
    from embtune.lora import LoraOptions, load_embedder_for_training

    options = LoraOptions(full_finetune=False, quant="none")
    how = plan(options, str(tiny_embedding), capability=None)
    model = load_embedder_for_training(str(tiny_embedding), options, how, 64)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved, inside = {}, [False]
    layer = model[0].auto_model.layers[1]
    layer.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True))
    layer.register_forward_hook(lambda *a: inside.__setitem__(0, False))

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if inside[0] and ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    rows, length = 4, 32
    ids = torch.randint(10, 1000, (rows, length))
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[0, :5] = 0
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model({"input_ids": ids, "attention_mask": mask})
    shape = ModelShape.from_config(tiny_embedding)
    s = Setting(batch_size=rows, lengths=(length,), weight_bytes=4, activation_bytes=4, trainable_bytes=4)
    assert sum(saved.values()) / (rows * length) == pytest.approx(layer_saved_bytes(shape, s, length), rel=0.05)


def test_saved_activations_of_a_bert_encoder_in_training_mode(minilm_path):
    """all-MiniLM-L6-v2 fully fine-tuned: dropout on the attention probabilities keeps three copies of them per
    layer, which a decoder without dropout does not; the count must hold within 15 % (a run that fits the estimate
    must not be killed)."""
    from embtune.memory import _kept_per_token
    from embtune.models import load_embedder

    model = load_embedder(minilm_path, device="cpu")
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    rows, length = 4, 128
    ids = torch.randint(1000, 2000, (rows, length))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model({"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)})
    shape = ModelShape.from_config(minilm_path)
    assert shape.attention_dropout == 0.1
    s = Setting(batch_size=rows, lengths=(length,), full_finetune=True)
    assert sum(saved.values()) / (rows * length) == pytest.approx(_kept_per_token(shape, s, length), rel=0.15)


QWEN3_06B = ModelShape(layers=28, hidden=1024, intermediate=3072, heads=16, kv_heads=8, head_dim=128, vocab=151_669,
                       n_params=595_776_512, dtype_bytes=2)  # fmt: skip
QWEN3_4B = ModelShape(layers=36, hidden=2560, intermediate=9728, heads=32, kv_heads=8, head_dim=128, vocab=151_669,
                      n_params=4_021_774_336, dtype_bytes=2)  # fmt: skip
QLORA_GPU = Setting(batch_size=32, lengths=(96, 512), quant="4bit", weight_bytes=2, activation_bytes=2,
                    trainable_bytes=2, device="cuda")  # fmt: skip


def test_on_a_gpu_checkpointing_is_on_only_where_the_step_would_not_fit_without_it():
    """As on a CPU: an H100 that holds Qwen3-0.6B's step without checkpointing trains without it (a third less
    compute); 10 % less memory than that step needs turns it on."""
    need = estimate(QWEN3_06B, QLORA_GPU, runtime=0).total
    roomy = decide(QWEN3_06B, QLORA_GPU, MemoryRequest(batch_size=32), available=1.1 * need / HEADROOM, resident=0,
                   runtime=0)  # fmt: skip
    assert (roomy.gradient_checkpointing, roomy.changed) == (False, [])
    tight = decide(QWEN3_06B, QLORA_GPU, MemoryRequest(batch_size=32), available=0.9 * need / HEADROOM, resident=0,
                   runtime=0)  # fmt: skip
    assert (tight.gradient_checkpointing, tight.loss, tight.changed) == (True, "qwen3", ["gradient checkpointing"])


def test_the_merge_phase_counts_one_16bit_candidate_after_the_trained_model_is_freed():
    """Qwen3-4B QLoRA: on a T4's 15 GB the slerp choice fits (one 8 GB candidate, nothing of training left); on an
    8 GB card training fits but the choice does not, which the plan says in one line before training. Shipping
    as trained (no candidates) streams the merge only and fits."""
    s = dataclasses.replace(QLORA_GPU, gradient_checkpointing=True, mini_batch_size=4)
    est = estimate(QWEN3_4B, s, runtime=0.6e9)
    assert est.phase == "merge"
    assert 0.6e9 + 2 * QWEN3_4B.n_params < est.total < 0.6e9 + 2 * QWEN3_4B.n_params + 2.5e9  # one candidate + encoding
    assert est.parts["weights"] + est.parts["trainable"] + est.parts["activations"] + 0.6e9 < 7.2e9
    t4 = decide(QWEN3_4B, QLORA_GPU, MemoryRequest(batch_size=32), available=15e9, resident=0, runtime=0.6e9)
    assert t4.estimate.total <= HEADROOM * 15e9
    with pytest.raises(NotEnoughMemory) as small:
        decide(QWEN3_4B, QLORA_GPU, MemoryRequest(batch_size=32), available=8e9, resident=0, runtime=0.6e9)
    assert str(small.value).count("\n") == 0
    assert str(small.value).startswith("after training, choosing what ships (merge_with_base='auto') loads one")
    assert "set merge_with_base=1.0" in str(small.value)
    forced = decide(QWEN3_4B, dataclasses.replace(QLORA_GPU, merge_choice=False), MemoryRequest(batch_size=32),
                    available=8e9, resident=0, runtime=0.6e9)  # fmt: skip
    assert forced.estimate.total <= HEADROOM * 8e9


FREED_BLOCKS = """
import ctypes, sys, psutil, torch
exec(sys.argv[1])  # the setup under test
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free(ctypes.c_void_p(libc.malloc(16 * 2**20)))  # a freed 16 MB block raises glibc's threshold to 16 MB
blocks, live = [], []
for _ in range(200):  # mini-batch activations, each followed by a live tensor (gradients, caches)
    blocks.append(torch.ones(2 * 2**20 // 4))
    live.append(torch.ones(2**17))
before = psutil.Process().memory_info().rss
del blocks
print((before - psutil.Process().memory_info().rss) / 2**20)
"""


def released_mb(setup: str) -> float:
    """MB that freeing 400 MB of 2 MB blocks, each below a live tensor, hands back to the OS after `setup`."""
    out = subprocess.run([sys.executable, "-c", FREED_BLOCKS, setup], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


LINUX_ONLY = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux")


@LINUX_ONLY
def test_freed_mini_batch_blocks_go_back_to_the_os_once_return_freed_blocks_is_set():
    assert released_mb("") < 50  # 400 MB freed, all of it still resident
    assert released_mb("from embtune.memory import return_freed_blocks; assert return_freed_blocks()") > 350


FIT_MEMORY = """
import tempfile
from embtune.train import TrainConfig, fit_memory
rows = {{"anchor": ["a question"] * 8, "positive": ["an answer to it"] * 8}}
config = TrainConfig(base_model={model!r}, data_dir="-", run_dir=tempfile.mkdtemp(), batch_size=8, full_finetune=False,
                     loss={loss!r}, mini_batch_size={mini})
assert (fit_memory(config, rows).mini_batch_size is None) == ({mini} is None)
"""


@LINUX_ONLY
def test_training_plans_with_the_cached_loss_on_a_cpu_return_freed_blocks_and_others_leave_glibc_as_it_is(
    tiny_embedding,
):
    cached = FIT_MEMORY.format(model=str(tiny_embedding), loss="cached_qwen3", mini=2)
    plain = FIT_MEMORY.format(model=str(tiny_embedding), loss="qwen3", mini=None)
    assert released_mb(cached) > 350
    assert released_mb(plain) < 50


@pytest.mark.parametrize(("backend", "quant", "full", "precision", "checkpoint", "expected"), [
    # (weight, activation, trainable bytes, device): what each loader is handed, by hand from embtune.lora
    ("peft", "4bit", False, "fp16", 4, (2, 2, 2, "cuda")),  # QLoRA on a T4: 16-bit compute and LoRA weights
    ("peft", "4bit", False, "fp32", 2, (4, 4, 4, "cpu")),  # 4-bit on a CPU computes in float32
    ("peft", "none", False, "bf16", 4, (2, 2, 2, "cuda")),  # LoRA on a GPU loads a float32 checkpoint in bf16
    ("peft", "none", True, "bf16", 2, (4, 2, 4, "cuda")),  # full fine-tuning: float32 master weights
    ("peft", "none", True, "fp32", 2, (4, 4, 4, "cpu")),  # a bf16 checkpoint on a CPU too
    ("peft", "none", False, "fp32", 2, (2, 2, 2, "cpu")),  # LoRA on a CPU: the checkpoint's dtype, as stored
    ("unsloth", "none", True, "bf16", 2, (4, 2, 4, "cuda")),  # unsloth full fine-tuning: float32 master weights
    ("unsloth", "none", False, "fp16", 4, (2, 2, 2, "cuda")),  # unsloth 16-bit LoRA of a float32 checkpoint
])  # fmt: skip
def test_the_setting_is_what_the_plan_loads(backend, quant, full, precision, checkpoint, expected):
    from embtune.lora import LoraOptions, Plan

    how = Plan(backend=backend, quant=quant, full_finetune=full, precision=precision, gradient_checkpointing=False,
               n_params=100_000, why="test", lora_r=8)  # fmt: skip
    shape = dataclasses.replace(QWEN3_06B, dtype_bytes=checkpoint)
    options = LoraOptions(target_modules=["q_proj", "v_proj"], lora_dropout=0.1)
    s = memory.setting_for(shape, how, 24, [40, 300], options)
    assert (s.weight_bytes, s.activation_bytes, s.trainable_bytes, s.device) == expected
    assert (s.batch_size, s.lengths, s.full_finetune, s.quant) == (24, (40, 300), full, quant)
    assert (s.lora_r, s.lora_targets, s.lora_dropout) == (8, ("q_proj", "v_proj"), 0.1)
    assert memory.setting_for(shape, how, 24, [40], None).lora_targets is None  # no options: every projection


def test_the_refusal_names_the_nearest_setting_of_each_kind_that_fits():
    """Qwen3-0.6B LoRA in float32 on a CPU, batch 32 of 64 + 300 tokens, a plain loss and no checkpointing asked
    for explicitly, and a budget just above batch 16's need (the batch is searched from half the batch down).
    The oracle tries each knob alone, from the setting down, with the estimate (tested by hand above)."""
    base = Setting(batch_size=32, lengths=(64, 300), weight_bytes=4, activation_bytes=4, trainable_bytes=4)

    def need(**changes):
        return estimate(QWEN3_06B, dataclasses.replace(base, **changes), runtime=1e9).total

    budget = need(batch_size=16) * 1.01
    fits = {name: need(**changes) <= budget for name, changes in {
        "as asked": {}, "checkpointing": {"gradient_checkpointing": True}, "cached": {"mini_batch_size": 1},
        "batch 16": {"batch_size": 16}, "max 256": {"lengths": (64, 256)}, "max 128": {"lengths": (64, 128)},
        "max 64": {"lengths": (64, 64)}, "4bit": {"quant": "4bit"}}.items()}  # fmt: skip
    assert fits == {"as asked": False, "checkpointing": True, "cached": True, "batch 16": True, "max 256": False,
                    "max 128": False, "max 64": True, "4bit": False}  # fmt: skip
    asked = MemoryRequest(batch_size=32, loss="qwen3", gradient_checkpointing=False)
    with pytest.raises(NotEnoughMemory) as raised:
        decide(QWEN3_06B, base, asked, available=budget / HEADROOM, resident=0, runtime=1e9)
    free = budget / HEADROOM
    assert str(raised.value) == (
        f"training needs ~{need() / 1e9:.1f} GB, {budget / 1e9:.1f} GB RAM to use (90% of {free / 1e9:.1f} GB free"
        " + 0.00 GB held): try gradient_checkpointing=True, or loss='cached_qwen3', or batch_size=16, or "
        "max_seq_length=64, or a GPU")  # fmt: skip
    # on a GPU, with the cached loss asked for (mini-batch 4): no "a GPU" and no cached twin to offer
    gpu = dataclasses.replace(base, device="cuda", mini_batch_size=4)
    cached = MemoryRequest(batch_size=32, loss="cached_qwen3", mini_batch_size=4, gradient_checkpointing=False)

    def gpu_fits(**changes):
        return estimate(QWEN3_06B, dataclasses.replace(gpu, **changes), runtime=1e9).total <= budget

    budget = 1.01 * estimate(QWEN3_06B, dataclasses.replace(gpu, batch_size=2, mini_batch_size=2), runtime=1e9).total
    assert not gpu_fits() and gpu_fits(gradient_checkpointing=True)
    assert not gpu_fits(batch_size=4) and gpu_fits(batch_size=2, mini_batch_size=2)
    assert not gpu_fits(lengths=(64, 256)) and gpu_fits(lengths=(64, 128))
    with pytest.raises(NotEnoughMemory) as raised:
        decide(QWEN3_06B, gpu, cached, available=budget / HEADROOM, resident=0, runtime=1e9)
    assert "GB GPU memory to use" in str(raised.value)
    assert str(raised.value).endswith("try gradient_checkpointing=True, or batch_size=2, or max_seq_length=128")


def test_the_other_phases_and_terms_add_up_by_hand():
    """The parts the first hand test leaves out, at asymmetric points: full fine-tuning's trainable state, LoRA on
    two projections only, the default runtime per device, and the evaluation and merge phases as the peak (the
    merge by its rule: streamed tensors, or one candidate loaded in 16-bit on a GPU, in the checkpoint's dtype
    on a CPU, encoding a batch of 32 without gradients)."""
    shape = ModelShape(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, vocab=1000,
                       n_params=100_000, dtype_bytes=4)  # fmt: skip
    s = Setting(batch_size=2, lengths=(8, 16), weight_bytes=4, activation_bytes=4, trainable_bytes=4, lora_r=16)
    full = estimate(shape, dataclasses.replace(s, full_finetune=True), runtime=0)
    assert full.parts["trainable"] == 100_000 * 4 * 3  # gradient and AdamW's two states; the weights apart
    two = estimate(shape, dataclasses.replace(s, lora_targets=("q_proj", "v_proj")), runtime=0)
    assert two.parts["trainable"] == 2 * 16 * ((64 + 64) + (64 + 32)) * 4 * 4
    assert estimate(shape, s).parts["runtime"] == memory.RUNTIME_CPU
    assert estimate(shape, dataclasses.replace(s, device="cuda")).parts["runtime"] == memory.CUDA_CONTEXT
    # evaluation (a batch of 32 of the longest column) outgrows a training step of 2 rows; the merge, not yet
    held = 5e6 + 100_000 * 4 + shape.lora_params(16) * 4 * 4
    evaluation = 1.1 * 32 * 16 * (2 * 4 * 64 + 0.5 * layer_saved_bytes(shape, s, 16))
    e = estimate(shape, dataclasses.replace(s, merge_choice=False), runtime=5e6)
    assert e.phase == "evaluation" and e.total == pytest.approx(held + evaluation)
    assert e.parts["evaluation"] == pytest.approx(evaluation) and e.parts["runtime"] == 5e6
    # the merge on a CPU: the folders mapped (MERGE_SHARE x the 16-bit size), or a float32 candidate encoding
    big = dataclasses.replace(shape, n_params=50_000_000)
    streamed = memory.MERGE_SHARE * 50_000_000 * 2
    assert memory.merge_bytes(big, dataclasses.replace(s, merge_choice=False), 7.0) == 7.0 + streamed
    one = Setting(1, (16,), full_finetune=True, activation_bytes=4)
    encoding = 1.1 * 32 * 16 * (2 * 4 * 64 + 0.5 * layer_saved_bytes(big, one, 16))
    assert memory.merge_bytes(big, s, 7.0) == pytest.approx(7.0 + 50_000_000 * 4 + encoding)
    merged = estimate(big, dataclasses.replace(s, weight_bytes=2), runtime=7.0)  # held in 16 bits, loaded in 32
    assert merged.phase == "merge" and merged.parts["merge"] == pytest.approx(50_000_000 * 4 + encoding)
    # on a GPU: the embedding matrix 8 bytes a weight, or a 16-bit candidate encoding in 16 bits
    gpu = dataclasses.replace(s, device="cuda")
    assert memory.merge_bytes(big, dataclasses.replace(gpu, merge_choice=False), 7.0) == 7.0 + 8 * 1000 * 64
    half = Setting(1, (16,), full_finetune=True, activation_bytes=2)
    encoding = 1.1 * 32 * 16 * (2 * 2 * 64 + 0.5 * layer_saved_bytes(big, half, 16))
    assert memory.merge_bytes(big, gpu, 7.0) == pytest.approx(7.0 + 50_000_000 * 2 + encoding)


def test_a_merge_that_cannot_fit_on_a_cpu_says_ram_and_what_streams():
    """The merge refusal's other branch: on a CPU, shipping as trained (no candidates), the streamed merge alone
    is too big."""
    s = dataclasses.replace(QLORA_GPU, device="cpu", quant="none", weight_bytes=4, activation_bytes=4,
                            trainable_bytes=4, merge_choice=False)  # fmt: skip
    with pytest.raises(NotEnoughMemory) as raised:
        decide(QWEN3_4B, s, MemoryRequest(batch_size=32), available=4e9, resident=0, runtime=1e9)
    assert str(raised.value).startswith("after training, merging the adapter streams the model's tensors: ~9.0 GB, "
                                        "3.6 GB RAM to use")  # fmt: skip
    assert "merge_with_base" not in str(raised.value)


def test_the_shape_of_other_architectures_is_read_from_their_configs(minilm_path, tiny_embedding, tmp_path):
    """A BERT encoder (no head_dim, no gated MLP, dropout on attention) and a bf16 Qwen3 checkpoint."""
    import json
    import shutil

    bert = ModelShape.from_config(minilm_path)
    assert (bert.layers, bert.hidden, bert.heads, bert.kv_heads, bert.head_dim, bert.intermediate) == (
        6, 384, 12, 12, 32, 1536)  # fmt: skip
    assert (bert.dtype_bytes, bert.gated_mlp, bert.qk_norm, bert.attention_dropout) == (4, False, False, 0.1)
    assert "gate_proj" not in bert.projections()
    folder = shutil.copytree(tiny_embedding, tmp_path / "bf16")
    config = json.loads((folder / "config.json").read_text())
    config.pop("dtype", None)
    (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))  # as older configs say
    qwen = ModelShape.from_config(folder, n_params=7)
    assert (qwen.dtype_bytes, qwen.gated_mlp, qwen.qk_norm, qwen.n_params, qwen.attention_dropout) == (
        2, True, True, 7, 0.0)  # fmt: skip


def test_the_plan_reads_the_machine_and_the_config_when_not_told(tiny_embedding):
    """Free memory and the process's own from the machine (a CPU: at least RUNTIME_CPU held; other tests may run
    beside this one, hence the loose match); the query prompt counted in the anchors' length."""
    c = config(tiny_embedding)
    how = plan(c, str(tiny_embedding), capability=None)
    p = plan_memory(c, tiny_embedding, how, ROWS)
    free, held = memory.available_memory("cpu")
    assert p.available == pytest.approx(free, rel=0.5) and p.resident == pytest.approx(held, rel=0.5)
    assert p.estimate.parts["runtime"] >= memory.RUNTIME_CPU
    prompt = memory.folder_prompt(tiny_embedding)
    assert p.lengths == padded_lengths(tiny_embedding, ROWS, 32, 64, {"anchor": prompt})
    assert p.lengths != padded_lengths(tiny_embedding, ROWS, 32, 64, {})
