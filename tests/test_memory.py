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
    lengths = padded_lengths(tiny_embedding, ROWS, 64, {"anchor": memory.folder_prompt(tiny_embedding)})
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
    assert (p.loss, p.mini_batch_size, p.gradient_checkpointing, p.changed) == ("cached_qwen3", 2, False, [])


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
    assert padded_lengths(tiny_embedding, ROWS, 512, {"anchor": prompt}) == (
        longest["anchor"] + 1, longest["positive"] + 1)  # fmt: skip
    assert padded_lengths(tiny_embedding, ROWS, 16, {"anchor": prompt}) == (16, 16), "capped"
    # notebook 02's rows come as a DatasetDict of sets with different columns: the longest set's batch counts
    from datasets import Dataset, DatasetDict

    sets = DatasetDict({"pairs": Dataset.from_dict(ROWS),
                        "hard_negatives": Dataset.from_dict({**ROWS, "negative_1": ROWS["positive"]})})  # fmt: skip
    assert padded_lengths(tiny_embedding, sets, 512, {"anchor": prompt}) == (
        longest["anchor"] + 1, longest["positive"] + 1, longest["positive"] + 1)  # fmt: skip
    assert padded_lengths(tiny_embedding, sets["pairs"], 512, {"anchor": prompt}) == (
        longest["anchor"] + 1, longest["positive"] + 1)  # a Dataset alone


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
    roomy = decide(QWEN3_06B, QLORA_GPU, MemoryRequest(), available=1.1 * need / HEADROOM, resident=0,
                   runtime=0)  # fmt: skip
    assert (roomy.gradient_checkpointing, roomy.changed) == (False, [])
    tight = decide(QWEN3_06B, QLORA_GPU, MemoryRequest(), available=0.9 * need / HEADROOM, resident=0,
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
    t4 = decide(QWEN3_4B, QLORA_GPU, MemoryRequest(), available=15e9, resident=0, runtime=0.6e9)
    assert t4.estimate.total <= HEADROOM * 15e9
    with pytest.raises(NotEnoughMemory) as small:
        decide(QWEN3_4B, QLORA_GPU, MemoryRequest(), available=8e9, resident=0, runtime=0.6e9)
    assert str(small.value).count("\n") == 0
    assert str(small.value).startswith("after training, choosing what ships (merge_with_base='auto') loads one")
    assert "set merge_with_base=1.0" in str(small.value)
    forced = decide(QWEN3_4B, dataclasses.replace(QLORA_GPU, merge_choice=False), MemoryRequest(),
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
    ("peft", "none", True, "fp16", 2, (4, 2, 4, "cuda")),  # full fine-tuning on a T4: fp16 compute
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
    default = memory.setting_for(shape, how, 24, [40], None)  # no options: every projection, LoRA's dropout
    assert (default.lora_targets, default.lora_dropout) == (None, 0.05)
    assert memory.setting_for(shape, how, 24, [40], LoraOptions(target_modules=[])).lora_targets is None


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
    asked = MemoryRequest(loss="qwen3", gradient_checkpointing=False)
    with pytest.raises(NotEnoughMemory) as raised:
        decide(QWEN3_06B, base, asked, available=budget / HEADROOM, resident=0, runtime=1e9)
    free = budget / HEADROOM
    assert str(raised.value) == (
        f"training needs ~{need() / 1e9:.1f} GB, {budget / 1e9:.1f} GB RAM to use (90% of {free / 1e9:.1f} GB free"
        " + 0.00 GB held): try gradient_checkpointing=True, or loss='cached_qwen3', or batch_size=16, or "
        "max_seq_length=64, or a GPU")  # fmt: skip
    # on a GPU, with the cached loss asked for (mini-batch 4): no "a GPU" and no cached twin to offer
    gpu = dataclasses.replace(base, device="cuda", mini_batch_size=4)
    cached = MemoryRequest(loss="cached_qwen3", mini_batch_size=4, gradient_checkpointing=False)

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
        decide(QWEN3_4B, s, MemoryRequest(), available=4e9, resident=0, runtime=1e9)
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
    assert isinstance(bert.head_dim, int)  # BERT's: hidden // heads
    # a decoder trained with dropout on its attention; no dtype at all: float32
    (folder / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.1, "dtype": None,
                                                    "head_dim": 32}))  # as Qwen3-0.6B: not hidden // heads
    dropped = ModelShape.from_config(folder, n_params=7)
    assert (dropped.attention_dropout, dropped.dtype_bytes, dropped.head_dim) == (0.1, 4, 32)
    # a vision-language model (Qwen3-VL): the language model's widths are in its text_config
    vl = tmp_path / "vl"
    vl.mkdir()
    (vl / "config.json").write_text(json.dumps({"model_type": "qwen3_vl", "text_config": {
        "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "intermediate_size": 96, "vocab_size": 500}}))  # fmt: skip
    text = ModelShape.from_config(vl, n_params=1)
    assert (text.layers, text.hidden, text.intermediate, text.kv_heads, text.vocab, text.qk_norm) == (
        3, 64, 96, 2, 500, True)  # fmt: skip


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
    assert p.lengths == padded_lengths(tiny_embedding, ROWS, 64, {"anchor": prompt})
    assert p.lengths != padded_lengths(tiny_embedding, ROWS, 64, {})


@pytest.mark.parametrize("files, expected", [
    ({"v2": ("1000000000", "250000000")}, 750_000_000),  # a container's limit, less what it uses
    ({"v2": ("max", "1"), "v1": ("1000000000", "1")}, None),  # v2 readable, no limit: v1 not read
    ({"v1": ("9223372036854771712", "1")}, None),  # cgroup v1's "no limit"
    ({"v1": ("2000000000", "500000000")}, 1_500_000_000),
    ({"v2": ("garbage", "1"), "v1": ("2000000000", "500000000")}, 1_500_000_000),  # unreadable v2: v1 decides
    ({"v2": (str(2**59), "0")}, None),  # a limit above the free RAM: the free RAM
], ids=["v2", "v2-max", "v1-unlimited", "v1", "v2-garbage", "v2-above-ram"])  # fmt: skip
def test_free_ram_is_taken_within_the_first_readable_cgroup_limit(files, expected, tmp_path, monkeypatch):
    """cgroup v2 then v1, written as a container writes them (the files this machine lacks); None: psutil's free
    RAM, which is far above the limits here."""
    import psutil

    paths = []
    for version in ("v2", "v1"):
        limit, usage = tmp_path / f"{version}.limit", tmp_path / f"{version}.usage"
        if version in files:
            limit.write_text(files[version][0] + "\n")
            usage.write_text(files[version][1] + "\n")
        paths.append((str(limit), str(usage)))
    monkeypatch.setattr(memory, "CGROUP_FILES", tuple(paths))
    free, held = memory.available_memory("cpu")
    if expected is None:
        assert free == pytest.approx(psutil.virtual_memory().available, rel=0.2) and free > 2e9
    else:
        assert free == expected
    assert held == pytest.approx(psutil.Process().memory_info().rss, rel=0.2)


@pytest.mark.parametrize("fraction, expected", [(1.0, 10e9), (0.5, 6e9)])
def test_free_gpu_memory_is_taken_within_the_process_s_share(fraction, expected, monkeypatch):
    """torch.cuda's readings (no GPU here: set to a 16 GB card with 10 GB free and 2 GB reserved by this process):
    a per-process fraction of 0.5 caps it at 8 - 2 GB."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (10e9, 16e9))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda: 2e9)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda: fraction)
    assert memory.available_memory("cuda") == (expected, 2e9)


QWEN_CPU = Setting(batch_size=32, lengths=(64, 300), weight_bytes=4, activation_bytes=4, trainable_bytes=4,
                   merge_choice=False)  # fmt: skip


def refusal(base: Setting, budget: float, request: MemoryRequest, shape=QWEN3_06B) -> str:
    """What the NotEnoughMemory line offers ("try ..."), runtime 0.1 GB."""
    with pytest.raises(NotEnoughMemory) as raised:
        decide(shape, base, request, available=budget / HEADROOM, resident=0, runtime=1e8)
    return str(raised.value).split(": try ", 1)[1]


@pytest.mark.parametrize("cap", [256, 128, 16])
def test_the_refusal_offers_the_longest_length_that_fits(cap):
    """The length searched from the power of two below the longest column (300 -> 256) down to 16: a budget just
    above what capping at `cap` needs offers exactly that cap; one under what 16 tokens need offers no length."""
    request = MemoryRequest(loss="qwen3", gradient_checkpointing=False)

    def need(n):
        return estimate(QWEN3_06B, dataclasses.replace(QWEN_CPU, lengths=(min(64, n), n)), runtime=1e8).total

    assert need(cap * 2 if cap < 256 else 300) > 1.001 * need(cap)
    assert f"max_seq_length={cap}," in refusal(QWEN_CPU, 1.001 * need(cap), request)
    assert "max_seq_length" not in refusal(QWEN_CPU, 0.999 * need(16), request)
    longest = dataclasses.replace(QWEN_CPU, lengths=(64, 257))  # 256 is below 257, and the first tried
    budget = 1.001 * estimate(QWEN3_06B, dataclasses.replace(QWEN_CPU, lengths=(64, 256)), runtime=1e8).total
    assert "max_seq_length=256," in refusal(longest, budget, request)


def test_the_refusal_offers_a_batch_of_one_when_only_that_fits():
    request = MemoryRequest(loss="qwen3", gradient_checkpointing=False)

    def need(b):
        return estimate(QWEN3_06B, dataclasses.replace(QWEN_CPU, batch_size=b), runtime=1e8).total

    assert need(2) > 1.001 * need(1)
    assert "batch_size=1," in refusal(QWEN_CPU, 1.001 * need(1), request)
    assert "batch_size" not in refusal(QWEN_CPU, 0.999 * need(1), request)


def test_the_refusal_offers_4bit_on_a_cpu_where_only_the_weights_are_too_big():
    """LoRA on float32 weights on a CPU, a budget under the weights alone but over the 4-bit model's whole step:
    4-bit (and a GPU) are all that fit; full fine-tuning is never offered 4-bit; on a GPU with nothing left to try:
    'a smaller model'."""
    request = MemoryRequest()  # loss and checkpointing left to the plan
    four_bit = dataclasses.replace(QWEN_CPU, gradient_checkpointing=True, mini_batch_size=1, quant="4bit",
                                   weight_bytes=4, activation_bytes=4, trainable_bytes=4)  # fmt: skip
    budget = 1.01 * estimate(QWEN3_06B, four_bit, runtime=1e8).total
    assert budget < 1e8 + memory.weight_bytes(QWEN3_06B, QWEN_CPU)
    assert refusal(QWEN_CPU, budget, request) == 'quant="4bit", or a GPU'
    full = dataclasses.replace(QWEN_CPU, full_finetune=True)  # 4-bit weights cannot be fully fine-tuned
    budget = 1.01 * estimate(QWEN3_06B, dataclasses.replace(four_bit, full_finetune=True), runtime=1e8).total
    assert budget < 1e8 + memory.weight_bytes(QWEN3_06B, full) + 3 * 4 * QWEN3_06B.n_params
    assert refusal(full, budget, request) == "a GPU"
    gpu = dataclasses.replace(QWEN_CPU, device="cuda", weight_bytes=2, activation_bytes=2, trainable_bytes=2)
    small_vocab = dataclasses.replace(QWEN3_06B, vocab=32_000)  # so that the merge (the embedding matrix) fits
    budget = 1.001 * memory.merge_bytes(small_vocab, gpu, 1e8)  # the merge fits, the weights and any step do not
    assert budget < 1e8 + memory.weight_bytes(small_vocab, gpu)
    assert refusal(gpu, budget, request, small_vocab) == "a smaller model"


@pytest.mark.parametrize("device, resident, runtime", [
    ("cpu", 5e8, memory.RUNTIME_CPU), ("cpu", 2e9, 2e9), ("cuda", 0, memory.CUDA_CONTEXT), ("cuda", 5e8, 5e8),
])  # fmt: skip
def test_the_runtime_is_what_the_process_holds_at_least_the_libraries_or_the_cuda_context(
        tiny_embedding, device, resident, runtime):  # fmt: skip
    """Not told the runtime: on a CPU what the process holds but at least the libraries' RUNTIME_CPU; on a GPU what
    torch holds there, plus the CUDA context when it holds nothing yet (not initialised)."""
    c = config(tiny_embedding)
    how = plan(c, str(tiny_embedding), capability=None if device == "cpu" else (8, 0))
    assert (how.precision == "fp32") == (device == "cpu")
    p = plan_memory(c, tiny_embedding, how, ROWS, available=1e12, resident=resident)
    assert p.estimate.parts["runtime"] == runtime and p.device == device
    assert (p.available, p.resident) == (1e12, resident)


def test_the_machine_is_read_only_for_what_the_caller_did_not_give(tiny_embedding):
    """`available` given and `resident` not: the given one is kept, the other read from this process."""
    c = config(tiny_embedding)
    how = plan(c, str(tiny_embedding), capability=None)
    p = plan_memory(c, tiny_embedding, how, ROWS, available=1e12, runtime=RUNTIME)
    free, held = memory.available_memory("cpu")
    assert p.available == 1e12 and p.resident == pytest.approx(held, rel=0.5) and p.resident != 1e12
    q = plan_memory(c, tiny_embedding, how, ROWS, resident=3e9, runtime=RUNTIME)
    assert q.resident == 3e9 and q.available == pytest.approx(free, rel=0.5)


def test_the_saved_bytes_of_other_layers_add_up_by_hand():
    """The branches the Qwen3-shaped hand test leaves out: a BERT-shaped layer (no gate, no q/k norms, dropout on the
    attention) with eager attention and full fine-tuning; LoRA on two projections without dropout."""
    bert = ModelShape(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, vocab=1000,
                      n_params=100_000, gated_mlp=False, qk_norm=False, attention_dropout=0.1)  # fmt: skip
    full = Setting(batch_size=8, lengths=(10,), full_finetune=True, attention="eager")
    # norms 4 x 2 x 64; eager: q, k, v 4 x 3 x 64 and the float32 softmax with its cast (4 + 4) x 4 heads x 10 keys;
    # dropout: probabilities, mask and dropped copy 3 x 4 x 4 x 10; MLP 4 x 128; projection inputs 2 x 2 x 4 x 64
    # and the MLP's 4 x 128
    assert layer_saved_bytes(bert, full, 10) == 512 + (768 + 320 + 480) + 512 + (1024 + 512)
    two = Setting(batch_size=8, lengths=(10,), lora_r=16, lora_targets=("q_proj", "down_proj"), lora_dropout=0.0)
    # sdpa: 4 x 4 x 64 + 4 x 4; no dropout copy: one input per adapted projection, 4 x (64 + 128), and 2 x 4 x 16
    assert layer_saved_bytes(bert, two, 10) == 512 + (1040 + 480) + 512 + (768 + 128)
    # what the merge's candidate encodes: a BERT layer with its dropout, 16 tokens
    one = Setting(1, (16,), full_finetune=True, activation_bytes=4)
    encoding = 1.1 * 32 * 16 * (2 * 4 * 64 + 0.5 * layer_saved_bytes(bert, one, 16))
    assert layer_saved_bytes(bert, one, 16) == 512 + (1040 + 3 * 4 * 4 * 16) + 512 + 1536
    assert memory.merge_bytes(bert, Setting(8, (16,)), 0) == pytest.approx(100_000 * 4 + encoding)
    assert bert.projections() == {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
                                  "up_proj": (64, 128), "down_proj": (128, 64)}  # fmt: skip


def test_the_model_s_own_folder_limit_and_prompt_are_read_from_a_sentence_transformers_layout(tiny_embedding,
                                                                                             tmp_path):  # fmt: skip
    """A sentence-transformers folder whose Transformer module lies in 0_Transformer/ (listed after another module):
    the shape, the max length and the tokenizer are read there; the prompt from the top folder; a bare checkpoint
    is its own folder."""
    import json
    import shutil

    top = tmp_path / "st"
    inner = shutil.copytree(tiny_embedding, top / "0_Transformer")
    (top / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {"query": "Q: ", "document": ""}}))
    (inner / "config_sentence_transformers.json").unlink()
    (inner / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 24}))
    (top / "modules.json").write_text(json.dumps([
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"}]))
    assert memory._transformer_folder(top) == inner and memory._transformer_folder(inner) == inner
    assert memory.model_max_length(top) == 24 and memory.model_max_length(tmp_path) is None
    assert ModelShape.from_config(memory._transformer_folder(top), n_params=1).layers == 2
    assert memory.folder_prompt(top) == "Q: " and memory.folder_prompt(inner) == ""
    assert memory.folder_prompt(top, "") == "" and memory.folder_prompt(top, "Find code").startswith("Instruct: Find")
    (top / "config_sentence_transformers.json").write_text(json.dumps({"prompts": None}))
    assert memory.folder_prompt(top) == ""
    anchors, positives = padded_lengths(tiny_embedding, ROWS, 512)
    assert anchors < 24 < positives
    assert padded_lengths(top, ROWS, 512) == (anchors, 24), "the folder's own limit caps the lengths"


def test_padded_lengths_read_a_seeded_sample_of_the_rows():
    """With `sample` rows of many, the longest of those rows counts (the sample drawn with `seed`), not the longest
    of all; a tokenizer handed in is used as is."""
    import random

    class Words:  # one token a word: lengths by hand
        def __call__(self, texts, **kwargs):
            return {"input_ids": [t.split() for t in texts]}

    rows = {"anchor": [" ".join(["w"] * n) for n in range(1, 101)]}
    assert padded_lengths("-", rows, 512, tokenizer=Words()) == (101,)
    drawn = random.Random(5).sample(range(100), 10)
    assert padded_lengths("-", rows, 512, sample=10, seed=5, tokenizer=Words()) == (max(drawn) + 2,)
    assert max(drawn) + 2 != padded_lengths("-", rows, 512, sample=10, seed=6, tokenizer=Words())[0]


def test_the_plan_s_line_says_every_choice_and_the_estimate_s_parts_over_50_mb():
    """The one line notebook 03 prints, whole: GB with one decimal from 0.95 GB up, two below; parts under 0.05 GB
    left out of the estimate's list."""
    e = memory.Estimate({"runtime": 1.1e9, "weights": 0.04e9, "trainable": 0.06e9, "activations": 2.345e9}, 3.5e9,
                        "training step")  # fmt: skip
    assert str(e) == "~3.5 GB (runtime 1.1, trainable 0.06, activations 2.3; peak in training step)"
    p = memory.MemoryPlan(e, available=4e9, resident=0.94e9, gradient_checkpointing=True, loss="cached_qwen3",
                          mini_batch_size=4, batch_size=32, lengths=(40, 256), device="cuda",
                          changed=["gradient checkpointing", "cached_qwen3 (mini-batch 4)"])  # fmt: skip
    assert str(p) == ("memory: needs ~3.5 GB (runtime 1.1, trainable 0.06, activations 2.3; peak in training step) "
                      "of 4.5 GB (90% of 4.0 GB free GPU memory + 0.94 GB held) | batch 32 x 40+256 tokens | gradient "
                      "checkpointing on | loss cached_qwen3 (mini-batch 4) | turned on: gradient checkpointing, "
                      "cached_qwen3 (mini-batch 4)")  # fmt: skip
    plain = dataclasses.replace(p, gradient_checkpointing=False, loss="qwen3", mini_batch_size=None, device="cpu",
                                changed=[])  # fmt: skip
    assert str(plain).endswith("GB free RAM + 0.94 GB held) | batch 32 x 40+256 tokens | gradient checkpointing off "
                               "| loss qwen3")  # fmt: skip


QWEN_SMALL = ModelShape(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, vocab=1000,
                        n_params=100_000, dtype_bytes=4)  # fmt: skip
LORA_SMALL = Setting(batch_size=8, lengths=(10, 20), weight_bytes=4, activation_bytes=4, trainable_bytes=4, lora_r=16)


def test_the_cached_loss_eager_attention_8bit_and_full_fine_tuning_add_up_by_hand():
    """The shape and LoRA setting of the first hand test (one layer saves 896 + 1040 + 1536 + 4544 = 8,016 bytes a
    token; 2 layers plus 768 bytes outside them: 16,800 a token), now with a cached loss, eager attention, 8-bit
    weights, full fine-tuning."""
    shape, s = QWEN_SMALL, LORA_SMALL
    # cached, mini-batch 2: the longer column's mini-batch (kept, then half a layer and the mask in the backward)
    # and the cached embeddings of 8 rows x 2 columns x 64 in float32 with their gradients
    step = 2 * 20 * 16_800 + 2 * 20 * 4008 + 2 * 20 * 20
    cached = estimate(shape, dataclasses.replace(s, mini_batch_size=2), runtime=0)
    assert cached.parts["activations"] == pytest.approx(1.1 * (step + 8 * 2 * 64 * 4 * 2))
    # eager: q, k, v 4 x 3 x 64 and the softmax (4 + 4) x 4 heads x n keys instead of sdpa's 1,040: 7,744 + 32 n a
    # layer; the backward's mask is 4 bytes a pair of tokens
    eager = dataclasses.replace(s, attention="eager", merge_choice=False)
    assert layer_saved_bytes(shape, eager, 20) == 7744 + 32 * 20
    kept = 8 * sum(n * (2 * (7744 + 32 * n) + 768) for n in (10, 20))
    backward = max(8 * n * 0.5 * (7744 + 32 * n) + 8 * n * n * 4 for n in (10, 20))
    e = estimate(shape, eager, runtime=0)
    assert e.parts["activations"] == pytest.approx(1.1 * (kept + backward))
    assert memory._backward_extra(shape, eager, 2, 10) == 2 * 10 * 0.5 * (7744 + 320) + 2 * 10 * 10 * 4
    step = max(2 * n * (2 * (7744 + 32 * n) + 768) + 2 * n * 0.5 * (7744 + 32 * n) + 2 * n * n * 4 for n in (10, 20))
    assert estimate(shape, dataclasses.replace(eager, mini_batch_size=2), runtime=0).parts["activations"] == (
        pytest.approx(1.1 * (step + 8 * 2 * 64 * 4 * 2)))  # fmt: skip
    assert (e.phase, list(e.parts)) == ("training step", ["runtime", "weights", "trainable", "activations"])
    evaluation = 1.1 * 32 * 20 * (2 * 4 * 64 + 0.5 * (7744 + 32 * 20))
    assert estimate(shape, dataclasses.replace(eager, batch_size=1), runtime=0).total == pytest.approx(
        e.parts["weights"] + e.parts["trainable"] + evaluation)  # fmt: skip
    # 8-bit: a byte per projection weight and a float32 scale per 4,096; the rest float32
    linear = shape.linear_params
    assert memory.weight_bytes(shape, dataclasses.replace(s, quant="8bit")) == (
        linear * (1 + 4 / 4096) + (100_000 - linear) * 4)  # fmt: skip
    # full fine-tuning of a layer with q/k norms: every projection's input, the normed q and k (4 x (64 + 32)) too
    full = dataclasses.replace(s, full_finetune=True)
    assert layer_saved_bytes(shape, full, 20) == 896 + 1040 + 1536 + (2 * 2 * 4 * 64 + 4 * 96 + 4 * 128)
    assert memory._mini_batches(32) == [16, 8, 4, 2, 1] and memory._mini_batches(1) == []


def test_the_plan_reads_each_option_of_the_config_it_is_given(tiny_embedding):
    """plan_memory's Setting comes from the config: the instruction (no prompt: shorter anchors), LoRA's rank,
    targets and dropout, merge_with_base (a number: no candidates after training), the batch; the decision from its
    loss and checkpointing. Checked against the estimate of the Setting written out here."""
    c = config(tiny_embedding, instruction="", lora_r=4, target_modules=["q_proj", "gate_proj"], lora_dropout=0.0,
               merge_with_base=1.0, batch_size=2, gradient_checkpointing=True, loss="mnrl")  # fmt: skip
    how = plan(c, str(tiny_embedding), capability=None)
    shape = ModelShape.from_config(tiny_embedding, n_params=how.n_params)
    shape = dataclasses.replace(shape, n_params=50_000_000)  # so that choosing the merge would make the peak
    p = plan_memory(c, tiny_embedding, how, ROWS, available=1e12, resident=0, runtime=RUNTIME, shape=shape)
    lengths = padded_lengths(tiny_embedding, ROWS, 64, {"anchor": ""})
    assert lengths != padded_lengths(tiny_embedding, ROWS, 64, {"anchor": memory.folder_prompt(tiny_embedding)})
    expected = Setting(batch_size=2, lengths=lengths, gradient_checkpointing=True, weight_bytes=4,
                       activation_bytes=4, trainable_bytes=4, lora_r=4, lora_targets=("q_proj", "gate_proj"),
                       lora_dropout=0.0, merge_choice=False)  # fmt: skip
    assert p.estimate == estimate(shape, expected, RUNTIME)
    auto = plan_memory(dataclasses.replace(c, merge_with_base="auto"), tiny_embedding, how, ROWS, available=1e12,
                       resident=0, runtime=RUNTIME, shape=shape)  # fmt: skip
    assert auto.estimate == estimate(shape, dataclasses.replace(expected, merge_choice=True), RUNTIME) != p.estimate
    assert (p.batch_size, p.lengths, p.loss, p.gradient_checkpointing, p.changed) == (2, lengths, "mnrl", True, [])
    assert shape.lora_params(4, ["gate_proj"]) == 2 * 4 * (64 + 128)
    applied = dataclasses.replace(p, gradient_checkpointing=False, loss="cached_mnrl", mini_batch_size=2).apply(c)
    assert (applied.gradient_checkpointing, applied.loss, applied.mini_batch_size) == (False, "cached_mnrl", 2)


def test_what_the_plan_turns_on_is_said_in_order(tiny_embedding):
    """Left open, checkpointing comes first and stays on under the cached loss; asked off, it stays off; a cached
    loss asked for without a mini-batch gets the largest that fits, checkpointing added only if it must be."""
    budget = (need(tiny_embedding, True, 8) + need(tiny_embedding, True, 16)) / 2
    p = planned(tiny_embedding, available_for(budget))
    assert p.changed == ["gradient checkpointing", "cached_qwen3 (mini-batch 8)"]
    off = (need(tiny_embedding, False, 8) + need(tiny_embedding, False, 16)) / 2
    p = planned(tiny_embedding, available_for(off), gradient_checkpointing=False)
    assert (p.gradient_checkpointing, p.mini_batch_size, p.changed) == (False, 8, ["cached_qwen3 (mini-batch 8)"])
    p = planned(tiny_embedding, available_for(off), loss="cached_qwen3")
    assert (p.gradient_checkpointing, p.mini_batch_size, p.changed) == (False, 8, ["mini-batch 8"])
    # Qwen3-0.6B's shape (evaluation in batches of 1, so that the training step makes the peak), where checkpointing
    # matters more than the mini-batch
    base = dataclasses.replace(QWEN_CPU, eval_batch_size=1)

    def qwen(checkpointing, mini):
        s = dataclasses.replace(base, gradient_checkpointing=checkpointing, mini_batch_size=mini)
        return estimate(QWEN3_06B, s, runtime=1e8).total

    budget = 1.001 * qwen(True, 2)
    assert qwen(False, 1) > budget and qwen(True, 4) > budget
    p = decide(QWEN3_06B, base, MemoryRequest(loss="cached_qwen3"), budget / HEADROOM, resident=0, runtime=1e8)
    assert (p.gradient_checkpointing, p.mini_batch_size, p.changed) == (True, 2, ["gradient checkpointing",
                                                                                  "mini-batch 2"])  # fmt: skip
    asked = MemoryRequest(loss="cached_qwen3", mini_batch_size=2)  # the mini-batch asked for is not "turned on"
    p = decide(QWEN3_06B, base, asked, budget / HEADROOM, resident=0, runtime=1e8)
    assert (p.gradient_checkpointing, p.mini_batch_size, p.changed) == (True, 2, ["gradient checkpointing"])


def test_decide_counts_what_the_process_holds_as_its_runtime_when_not_told():
    p = decide(QWEN_SMALL, LORA_SMALL, MemoryRequest(), available=1e12, resident=7e8)
    assert p.estimate.parts["runtime"] == 7e8 and p.resident == 7e8


def test_a_merge_that_cannot_fit_on_a_gpu_says_gpu_memory_and_how_to_skip_the_candidates():
    with pytest.raises(NotEnoughMemory) as raised:
        decide(QWEN3_4B, QLORA_GPU, MemoryRequest(), available=4e9, resident=0, runtime=1e9)
    assert str(raised.value) == (
        "after training, choosing what ships (merge_with_base='auto') loads one slerp candidate in 16-bit: ~10.9 GB, "
        "3.6 GB GPU memory to use (90% of 4.0 GB free + 0.00 GB held): set merge_with_base=1.0 to ship the model as "
        "trained without scoring candidates")  # fmt: skip


def test_the_4bit_offer_on_a_cpu_counts_float32_compute_whatever_the_checkpoint():
    """A bf16 checkpoint on a CPU trains LoRA in bf16 (setting_for), but 4-bit there computes in float32: a budget
    that 4-bit would fit only in 16 bits gets no 4-bit offer."""
    bf16 = dataclasses.replace(QWEN_CPU, weight_bytes=2, activation_bytes=2, trainable_bytes=2)
    smallest = dataclasses.replace(bf16, gradient_checkpointing=True, mini_batch_size=1)
    four_bit = dataclasses.replace(smallest, quant="4bit")
    in_16 = estimate(QWEN3_06B, four_bit, runtime=1e8).total
    in_32 = estimate(QWEN3_06B, dataclasses.replace(four_bit, activation_bytes=4, trainable_bytes=4), 1e8).total
    mixed = max(estimate(QWEN3_06B, dataclasses.replace(four_bit, activation_bytes=4), 1e8).total,
                estimate(QWEN3_06B, dataclasses.replace(four_bit, trainable_bytes=4), 1e8).total)  # fmt: skip
    ceiling = min(in_32, estimate(QWEN3_06B, smallest, runtime=1e8).total)
    assert in_16 < mixed < ceiling
    assert "4bit" not in refusal(bf16, (mixed + ceiling) / 2, MemoryRequest())
