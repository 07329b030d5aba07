"""Training on the tiny Qwen3 model: outputs, merge, slerp, 4-bit gradients, resume, DDP."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SAMPLES
from embtune.data import load_beir
from embtune.encode import encode, instruct
from embtune.losses import qwen3_infonce
from embtune.merge import slerp_models
from embtune.models import load_embedder
from embtune.synthetic import SynthConfig, generate
from embtune.train import TrainConfig, load_for_training, train

TEXTS = ["how to sort a list", "sorted returns a new sorted list from the items in iterable", "open a file"]


def config(tiny_embedding, run_dir, **overrides):
    values = dict(
        base_model=str(tiny_embedding),
        data_dir=str(SAMPLES / "pydocs"),
        run_dir=str(run_dir),
        max_steps=6,
        eval_steps=3,
        batch_size=8,
        max_seq_length=64,
        eval_corpus_size=100,
        full_finetune=False,
        learning_rate=5e-3,
    )
    return TrainConfig(**{**values, **overrides})


TASK = "Given a question about Python, retrieve the documentation that answers it"


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    """LoRA on the tiny model with an instruction of our own, which the merged model must carry."""
    run_dir = tmp_path_factory.mktemp("run")
    log = train(config(tiny_models[0], run_dir, merge_dtype="float32", instruction=TASK))
    return run_dir, log


def test_training_writes_adapter_model_and_log(trained, tiny_embedding, tmp_path):
    """The log and plots; the dev curve starts at step 0 (the base); model/ is the slerp at the t the dev queries
    chose (evaluate.choose_on_dev), finetuned/ the model as trained."""
    run_dir, log = trained
    assert (run_dir / "adapter" / "adapter_config.json").exists()
    assert log["backend"].startswith("sentence-transformers + peft | none | LoRA r=16")
    assert "mixed precision fp32" in log["backend"]  # the CPU
    saved = json.loads((run_dir / "train_log.json").read_text())
    assert [p["step"] for p in saved["eval_curve"]] == [0, 3, 6]
    assert saved["loss_curve"] and saved["seconds"] > 0 and saved["peak_memory_mb"] > 0
    assert saved["n_dev_queries"] == 69  # pydocs has a dev split
    assert all((run_dir / name).read_bytes()[:4] == b"\x89PNG" for name in ("train_loss.png", "merge.png"))
    curve = saved["merge_curve"]
    assert [p["t"] for p in curve] == [0.0, 0.25, 0.5, 0.75, 1.0] and all(p["se"] > 0 for p in curve)
    row = {p["t"]: p for p in curve}  # the two questions, by hand from the curve's p-values
    clear = [t for t in (0.25, 0.5, 0.75) if row[t]["p_vs_default"] < 0.05 / 3]
    shipped = 0.0 if row[1.0]["p_vs_base"] >= 0.05 else max(clear, key=lambda t: row[t]["ndcg@10"], default=1.0)
    assert saved["merge_with_base"] == shipped and f"t = {shipped}" in saved["merge_why"]
    expected = slerp_models(tiny_embedding, run_dir / "finetuned", shipped, tmp_path / "expected")
    np.testing.assert_allclose(encode(load_embedder(str(run_dir / "model"), device="cpu"), TEXTS),
                               encode(load_embedder(str(expected), device="cpu"), TEXTS), atol=1e-6)  # fmt: skip


def test_the_adapter_that_ships_is_the_chosen_checkpoint_s(trained):
    """The checkpoint is chosen explicitly (the end, unless the best dev step beats it clearly) and adapter/ holds
    exactly that checkpoint's tensors."""
    from safetensors.torch import load_file

    run_dir, log = trained
    assert log["checkpoint"] in ("end", "step 3") and log["checkpoint_why"].startswith("checkpoint: ")
    step = 6 if log["checkpoint"] == "end" else 3
    shipped, kept = (load_file(f / "adapter_model.safetensors")
                     for f in (run_dir / "adapter", run_dir / "checkpoints" / f"checkpoint-{step}"))  # fmt: skip
    assert shipped.keys() == kept.keys() and all(torch.equal(shipped[k], kept[k]) for k in kept)


def test_a_checkpoint_s_adapter_is_restored_into_a_4bit_model_exactly_or_not_at_all(trained, tiny_embedding,
                                                                                     tmp_path):  # fmt: skip
    """sentence-transformers' own best-model reload fails on a 4-bit base and only logs it; ours loads the LoRA
    tensors and checks each one, and a checkpoint missing one is refused by name."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    from embtune.train import restore_checkpoint

    run_dir, _ = trained
    model, how = load_for_training(config(tiny_embedding, "unused", quant="4bit"))
    assert how.quant == "4bit"
    checkpoint = run_dir / "checkpoints" / "checkpoint-3"
    restore_checkpoint(model, checkpoint)
    saved, now = load_file(checkpoint / "adapter_model.safetensors"), get_peft_model_state_dict(model[0].auto_model)
    assert {f"base_model.model.{k}" for k in now} == saved.keys()
    assert all(torch.equal(now[k].cpu(), saved[f"base_model.model.{k}"]) for k in now)
    partial = shutil.copytree(checkpoint, tmp_path / "checkpoint-partial")
    del saved[sorted(saved)[0]]
    save_file(saved, partial / "adapter_model.safetensors")
    with pytest.raises(RuntimeError, match="checkpoint-partial/adapter_model.safetensors: 1 adapter tensors did not"):
        restore_checkpoint(model, partial)


def test_a_4bit_lora_run_ships_its_best_dev_checkpoint_when_it_is_not_the_last(minilm_path, tmp_path, caplog):
    """Planted: a learning rate that wrecks all-MiniLM-L6-v2's LoRA run step by step, so the dev queries clearly
    prefer step 3 to the end (step 6). peft + bitsandbytes 4-bit, where sentence-transformers' own best-model
    reload fails and only logs it: adapter/ holds step 3's tensors, finetuned/ is step 3 merged, nothing logs an
    error."""
    from safetensors.torch import load_file

    from embtune.merge import merge_adapter

    run = tmp_path / "run"
    log = train(TrainConfig(base_model=minilm_path, data_dir=str(SAMPLES / "pydocs"), run_dir=str(run), max_steps=6,
                            eval_steps=3, batch_size=16, learning_rate=2e-2, warmup_ratio=0.0, max_seq_length=64,
                            eval_corpus_size=200, full_finetune=False, quant="4bit", merge_with_base=1.0))  # fmt: skip
    assert "| 4bit | LoRA" in log["backend"]
    assert log["checkpoint"] == "step 3", log["checkpoint_why"]
    shipped, kept = (load_file(f / "adapter_model.safetensors")
                     for f in (run / "adapter", run / "checkpoints" / "checkpoint-3"))  # fmt: skip
    assert shipped.keys() == kept.keys() and all(torch.equal(shipped[k], kept[k]) for k in kept)
    expected = merge_adapter(minilm_path, run / "checkpoints" / "checkpoint-3", tmp_path / "step3")
    np.testing.assert_allclose(encode(load_embedder(str(run / "finetuned"), device="cpu"), TEXTS),
                               encode(load_embedder(str(expected), device="cpu"), TEXTS), atol=1e-5)  # fmt: skip
    assert not [r.getMessage() for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


def test_after_training_nothing_holds_the_trained_model(tiny_embedding, tmp_path):
    """The merge and the slerp candidates load whole 16-bit models after training; the memory plan counts on the
    trained model (and its optimizer) being gone by then: no reference survives release_trained."""
    import gc
    import weakref

    from embtune.train import build_trainer, release_trained

    training = build_trainer(config(tiny_embedding, tmp_path / "run", max_steps=1, eval_steps=1))
    training.trainer.train()
    model, optimizer = weakref.ref(training.trainer.model), weakref.ref(training.trainer.optimizer)
    release_trained(training.trainer)
    gc.collect()
    assert model() is None and optimizer() is None


def test_a_full_checkpoint_is_restored_whole(minilm_path, tmp_path):
    from embtune.train import restore_checkpoint

    changed = load_embedder(minilm_path, device="cpu")
    with torch.no_grad():
        for p in changed.parameters():
            p.mul_(0.9)
    changed.save(str(tmp_path / "checkpoint-9"))
    model = load_embedder(minilm_path, device="cpu")
    restore_checkpoint(model, tmp_path / "checkpoint-9")
    np.testing.assert_allclose(encode(model, TEXTS), encode(changed, TEXTS), atol=1e-6)


def test_what_ships_is_the_base_when_training_hurts_on_judged_dev_queries(minilm, minilm_path, tmp_path):
    """Planted: a learning rate that wrecks all-MiniLM-L6-v2 in a few steps. No training labels, only synthetic
    (inverse cloze) queries, and the data's own dev split of judged queries: those decide (a dev split cut from
    synthetic queries would not, t = 0.5 above); on them nothing beats the base, so model/ is the base model,
    and the run says so."""
    data_dir = shutil.copytree(SAMPLES / "pydocs", tmp_path / "data")
    (data_dir / "qrels" / "train.tsv").unlink()
    run_dir = tmp_path / "run"
    generate(minilm, minilm_path, load_beir(data_dir, limits="off"),
             SynthConfig(data_dir=str(data_dir), run_dir=str(run_dir), base_model=minilm_path, generator_model="ict",
                         min_cosine=None, round_trip_k=None, max_documents=200))  # fmt: skip
    log = train(TrainConfig(base_model=minilm_path, data_dir=str(data_dir), run_dir=str(run_dir), max_steps=6,
                            eval_steps=6, batch_size=16, learning_rate=5e-3, max_seq_length=64, eval_corpus_size=200,
                            merge_grid=[0.5]))  # fmt: skip
    assert log["n_dev_queries"] == 69 and log["n_train_rows"] > 150  # the data's dev split; synthetic pairs
    curve = {p["t"]: p["ndcg@10"] for p in log["merge_curve"]}
    assert curve[1.0] < curve[0.0] - 0.1 and log["merge_with_base"] == 0.0
    assert log["merge_why"].startswith("model/ is the base model (t = 0.0)")
    shipped, base = (load_embedder(p, device="cpu") for p in (str(run_dir / "model"), minilm_path))
    np.testing.assert_allclose(encode(shipped, TEXTS), encode(base, TEXTS), atol=1e-6)


def test_merged_model_loads_with_plain_sentence_transformers(trained, tiny_embedding):
    """No project code: a fresh interpreter with only sentence-transformers loads and uses model/."""
    run_dir, _ = trained
    script = (
        "import sys; from sentence_transformers import SentenceTransformer as S; m = S(sys.argv[1]); "
        "print(m.prompts['query']); print(m.tokenizer.padding_side); print(m.encode(['x']).shape)"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(run_dir / "model")],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": ""},
        cwd="/",
    ).stdout
    assert f"Instruct: {TASK}" in out and "left" in out and "(1, 64)" in out
    card = (run_dir / "model" / "README.md").read_text()
    assert "sentence-transformers" in card


def test_merge_equals_adapter_and_changes_the_model(trained, tiny_embedding):
    """Queries (each model's own query prompt) and documents: the merged model encodes as the adapter does."""
    run_dir, _ = trained
    merged, adapter, base = (load_embedder(str(p), device="cpu") for p in (run_dir / "finetuned", run_dir / "adapter",
                                                                            tiny_embedding))  # fmt: skip
    for kind in ("query", "document"):
        np.testing.assert_allclose(encode(merged, TEXTS, kind), encode(adapter, TEXTS, kind), atol=1e-4)
    assert merged.prompts["query"] == adapter.prompts["query"] == instruct(TASK) != base.prompts["query"]
    assert np.abs(encode(merged, TEXTS) - encode(base, TEXTS)).max() > 1e-2  # the LoRA update landed


def test_slerp_of_the_trained_model_goes_from_the_base_to_it(trained, tiny_embedding, tmp_path):
    """The model-level ends and middle (the formula itself: tests/test_merge.py)."""
    run_dir, _ = trained

    def at(t):
        folder = slerp_models(tiny_embedding, run_dir / "finetuned", t, tmp_path / f"t{t}")
        return load_embedder(str(folder), device="cpu")

    base = encode(load_embedder(str(tiny_embedding), device="cpu"), TEXTS, progress=False)
    tuned = encode(load_embedder(str(run_dir / "finetuned"), device="cpu"), TEXTS, progress=False)
    np.testing.assert_allclose(encode(at(0.0), TEXTS, progress=False), base, atol=1e-5)
    np.testing.assert_allclose(encode(at(1.0), TEXTS, progress=False), tuned, atol=1e-5)
    half = at(0.5)
    assert 0 < np.abs(encode(half, TEXTS, progress=False) - base).max() < np.abs(tuned - base).max()
    assert half.prompts["query"] == instruct(TASK)  # the fine-tuned model's prompts


UNSLOTH_SAVE = """
import sys
from unsloth.models.sentence_transformer import FastSentenceTransformer
from transformers import AutoConfig
# unsloth's own save step: the base config.json beside the adapter
FastSentenceTransformer._save_base_config_for_processor_resume(AutoConfig.from_pretrained(sys.argv[1]), sys.argv[2])
"""


def test_merge_reads_an_adapter_folder_as_unsloth_writes_it(trained, tiny_embedding, tmp_path):
    """unsloth saves the base config.json beside the adapter, which makes sentence-transformers take the folder
    for a whole model; the merge reads the folder's files and gives the same model as from peft's layout."""
    from embtune.merge import merge_adapter

    run_dir, _ = trained
    adapter = shutil.copytree(run_dir / "adapter", tmp_path / "unsloth-adapter")
    done = subprocess.run([sys.executable, "-c", UNSLOTH_SAVE, str(tiny_embedding), str(adapter)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert (adapter / "config.json").exists() and (adapter / "adapter_config.json").exists()
    with pytest.raises(Exception, match="model.safetensors|no file named"):
        load_embedder(str(adapter), device="cpu")  # what the old merge did first
    merged = load_embedder(str(merge_adapter(str(tiny_embedding), adapter, tmp_path / "merged")), device="cpu")
    expected = load_embedder(str(run_dir / "finetuned"), device="cpu")
    for kind in ("query", "document"):
        np.testing.assert_allclose(encode(merged, TEXTS, kind), encode(expected, TEXTS, kind), atol=1e-4)


def test_synthetic_only_training_is_merged_half_way_with_the_base(tmp_path, tiny_embedding):
    data_dir = tmp_path / "data"
    (data_dir / "qrels").mkdir(parents=True)
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):  # no train labels
        shutil.copy(SAMPLES / "pydocs" / name, data_dir / name)
    run_dir = tmp_path / "run"
    model = load_embedder(str(tiny_embedding), device="cpu")
    generate(model, str(tiny_embedding), load_beir(data_dir, limits="off"),
             SynthConfig(data_dir=str(data_dir), run_dir=str(run_dir), base_model=str(tiny_embedding),
                         generator_model="ict", round_trip_k=None))  # fmt: skip
    log = train(config(tiny_embedding, run_dir, data_dir=str(data_dir), merge_dtype="float32"))
    assert log["merge_with_base"] == 0.5 and log["finetuned_model"] == str(run_dir / "finetuned")
    finetuned = load_embedder(str(run_dir / "finetuned"), device="cpu")
    merged = load_embedder(str(run_dir / "model"), device="cpu")
    half = load_embedder(str(slerp_models(tiny_embedding, run_dir / "finetuned", 0.5, tmp_path / "half")), device="cpu")
    expected = encode(half, TEXTS, progress=False)
    np.testing.assert_allclose(encode(merged, TEXTS, progress=False), expected, atol=1e-5)
    assert merged.prompts == finetuned.prompts


def test_lora_gradients_through_4bit_match_dequantised(tiny_embedding):
    """bitsandbytes warns on the CPU that a 4-bit kernel has no autograd registration: check the LoRA
    gradients through the 4-bit weights against the same LoRA on the de-quantised weights, after an eval
    forward like the dev evaluation (which used to switch bitsandbytes to that kernel for good)."""
    import bitsandbytes as bnb

    from embtune.losses import Qwen3InfoNCELoss

    quantised, how = load_for_training(config(tiny_embedding, "unused", quant="4bit", lora_dropout=0.0))
    assert how.quant == "4bit" and how.precision == "fp32"
    torch.manual_seed(0)
    for name, p in quantised.named_parameters():
        if "lora_B" in name:  # B starts at zero, which would make every A gradient zero
            torch.nn.init.normal_(p, std=0.05)
    dense, _ = load_for_training(config(tiny_embedding, "unused", quant="none", lora_dropout=0.0))
    dense_modules = dict(dense.named_modules())
    for name, module in quantised.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            dense_modules[name].weight.data.copy_(weight.to(torch.float32))
    dense.load_state_dict({k: v for k, v in quantised.state_dict().items() if "lora_" in k}, strict=False)

    quantised.eval()
    with torch.no_grad():
        quantised.encode(["an evaluation pass"])
    quantised.train()
    features = [
        quantised.preprocess(["how to sort a list", "open a file"]),
        quantised.preprocess(["sorted returns a new list", "open returns a file object"]),
    ]

    def lora_grads(model):
        model.zero_grad()
        Qwen3InfoNCELoss(model)([dict(f) for f in features]).backward()
        return {n: p.grad for n, p in model.named_parameters() if "lora_" in n}

    q, d = lora_grads(quantised), lora_grads(dense)
    assert q.keys() == d.keys() and len(q) > 0
    for name in q:
        assert q[name].abs().sum() > 0, f"{name}: no gradient through the 4-bit path"
        rel = (q[name] - d[name]).norm() / d[name].norm()
        # The right path computes the same float32 products as the de-quantised model: agreement to rounding.
        assert rel < 1e-5, f"{name}: 4-bit and de-quantised LoRA gradients differ by {rel:.2e}"


KILL_AT_CHECKPOINT_4 = """
import os, signal, sys
from transformers import TrainerCallback
from embtune.train import TrainConfig, train

class Kill(TrainerCallback):  # a lost Colab session right after a checkpoint was written
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 4:
            os.kill(os.getpid(), signal.SIGKILL)

train(TrainConfig(**eval(sys.argv[1])), callbacks=[Kill()])
"""


def test_resume_continues_from_the_checkpoint_to_the_uninterrupted_model(tmp_path, tiny_embedding):
    """Killed after checkpoint 4 of 12, the rerun runs steps 5-12 only (counted, not read from a log) and ends
    with the same weights as a run never interrupted: optimiser, schedule, data order and RNG all restored."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    settings = dict(max_steps=12, eval_steps=4, learning_rate=2e-3)
    whole = tmp_path / "whole"
    train(config(tiny_embedding, whole, **settings))
    cut = tmp_path / "cut"
    fields = repr(dataclasses.asdict(config(tiny_embedding, cut, **settings)))
    killed = subprocess.run([sys.executable, "-c", KILL_AT_CHECKPOINT_4, fields], capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (cut / "checkpoints" / "checkpoint-4" / "trainer_state.json").exists() and not (cut / "model").exists()
    (cut / "checkpoints" / "checkpoint-999").mkdir()  # as a kill in the middle of saving leaves one

    class Count(TrainerCallback):
        steps = []

        def on_step_end(self, args, state, control, **kwargs):
            Count.steps.append(state.global_step)

    log = train(config(tiny_embedding, cut, **settings), callbacks=[Count()])
    assert Count.steps == list(range(5, 13))
    assert not (cut / "checkpoints" / "checkpoint-999").exists()
    # The last checkpoint's weights (not model/, which is the best dev checkpoint and may be step 4's).
    expected, resumed = (load_file(run / "checkpoints" / "checkpoint-12" / "adapter_model.safetensors")
                         for run in (whole, cut))  # fmt: skip
    assert expected.keys() == resumed.keys() and expected
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], atol=1e-6, rtol=0)
    assert log["loss_curve"] == json.loads((whole / "train_log.json").read_text())["loss_curve"]
    # one dev evaluation per step, as the uninterrupted run logs them (the resumed one evaluates step 4 again)
    assert [p["step"] for p in log["eval_curve"]] == [0, 4, 8, 12]
    assert [p["step"] for p in json.loads((whole / "train_log.json").read_text())["eval_curve"]] == [0, 4, 8, 12]


GATHER = """
import sys, torch, torch.distributed as dist
from embtune.losses import qwen3_infonce

rank, store = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
q, pos, neg = torch.load(sys.argv[3])
rows = slice(4 * rank, 4 * rank + 4)
mine = [x[rows].clone().requires_grad_() for x in (q, pos, neg)]
keys = [torch.arange(8)[rows], torch.arange(8, 16)[rows]]
loss = qwen3_infonce(mine[0], mine[1:], keys, gather=True)
loss.backward()
torch.save((loss.detach(), [x.grad for x in mine]), sys.argv[4])
dist.destroy_process_group()
"""


def test_ddp_gathers_negatives_across_processes(tmp_path):
    """Two real processes (gloo), four rows each: with gathering, each process's loss and gradients are its
    rows' share of the loss over all eight rows, in-batch negatives from the other process included."""
    torch.manual_seed(0)
    q, pos, neg = (torch.randn(8, 16) for _ in range(3))
    torch.save((q, pos, neg), tmp_path / "batch.pt")
    files = [str(tmp_path / name) for name in ("store", "batch.pt")]
    procs = [subprocess.Popen([sys.executable, "-c", GATHER, str(r), *files, str(tmp_path / f"rank{r}.pt")],
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for r in (0, 1)]  # fmt: skip
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    full = [x.clone().requires_grad_() for x in (q, pos, neg)]
    whole = qwen3_infonce(full[0], full[1:], [torch.arange(8), torch.arange(8, 16)])
    whole.backward()
    (loss0, grads0), (loss1, grads1) = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    torch.testing.assert_close((loss0 + loss1) / 2, whole.detach())
    alone = qwen3_infonce(q[:4], [pos[:4], neg[:4]], [torch.arange(4), torch.arange(8, 12)])
    assert abs(loss0 - alone) > 1e-3  # without the other process's rows the loss is another number
    # Gathering sends each process the gradient of both losses for its rows; DDP then averages over the two.
    for mine, grad0, grad1 in zip(full, grads0, grads1, strict=True):
        torch.testing.assert_close(torch.cat([grad0, grad1]) / 2, mine.grad, atol=1e-6, rtol=1e-4)


def test_training_entry_point_runs_under_torchrun(tmp_path, tiny_embedding):
    """The training entry point runs unchanged under torchrun (2 processes, gloo) with the loss gathering."""
    run_dir = tmp_path / "run"
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node=2", "--master_port=29533"]
    args = [f"--base_model={tiny_embedding}", f"--data_dir={SAMPLES / 'pydocs'}", f"--run_dir={run_dir}",
            "--max_steps=2", "--eval_steps=2", "--batch_size=8", "--max_seq_length=64", "--eval_corpus_size=100",
            "--full_finetune=false"]  # fmt: skip
    done = subprocess.run([*torchrun, "-m", "embtune.train", *args], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = json.loads((run_dir / "train_log.json").read_text())
    assert log["world_size"] == 2 and log["loss"]["gather_across_devices"] is True
    assert (run_dir / "model" / "model.safetensors").exists()


def test_plan_full_for_small_models_lora_for_large(tmp_path, minilm_path):
    """Decided from the config before loading: MiniLM is fully fine-tuned; the Qwen3-Embedding-0.6B shape gets
    LoRA, 4-bit where there is a GPU; the parameter count is the real one (596M, as the model card's 0.6B)."""
    from transformers import Qwen3Config

    from embtune.lora import LoraOptions, plan

    big = tmp_path / "qwen3-0.6b-shape"
    Qwen3Config(vocab_size=151_669, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                num_attention_heads=16, num_key_value_heads=8, head_dim=128).save_pretrained(big)  # fmt: skip
    small = plan(LoraOptions(), minilm_path, capability=None)
    assert small.full_finetune and small.quant == "none" and small.n_params == 22_713_216
    on_cpu, on_t4 = plan(LoraOptions(), str(big), capability=None), plan(LoraOptions(), str(big), capability=(7, 5))
    assert not on_cpu.full_finetune and on_cpu.quant == "none" and on_cpu.n_params == 595_776_512
    assert on_t4.quant == "4bit" and on_t4.precision == "fp16" and on_t4.gradient_checkpointing
    with pytest.raises(ValueError, match="full fine-tuning needs quant='none'"):
        plan(LoraOptions(quant="4bit", full_finetune=True), str(big), capability=None)


def test_trains_on_hard_negatives_with_short_rows_apart(tmp_path, tiny_embedding):
    """Rows the filters left with fewer than max_negatives negatives train on in-batch negatives, in their own set;
    dev queries never enter training."""
    from embtune.data import load_beir, split_train_dev, training_labels
    from embtune.mine import save
    from embtune.rundir import data_fingerprint, make_manifest
    from embtune.train import training_dataset

    run_dir = tmp_path / "run"
    (run_dir / "hard_negatives").mkdir(parents=True)
    data = load_beir(SAMPLES / "pydocs")
    cfg = config(tiny_embedding, run_dir, max_negatives=2, max_steps=3)
    labels = training_labels(data, run_dir)
    train_qrels, dev_qrels = split_train_dev(data, labels, cfg.seed, cfg.dev_fraction)
    docs = data.doc_texts()
    rows = []
    for i, (q, positives) in enumerate(sorted({**train_qrels, **dev_qrels}.items())):
        pos = next(iter(positives))
        negs = [d for d in list(docs)[i : i + 3] if d != pos][: 2 if i % 3 else 1]
        rows.append(
            {
                "query_id": q,
                "query": data.queries[q],
                "positive_id": pos,
                "positive": docs[pos],
                "negative_ids": negs,
                "negatives": [docs[d] for d in negs],
                "positive_score": 0.5,
                "negative_scores": [0.1] * len(negs),
            }
        )
    made_from = make_manifest({"data": data_fingerprint(SAMPLES / "pydocs"), "synthetic": None}, {})
    save(rows, {"made_from": made_from}, run_dir)  # as notebook 02 saves them
    dataset = training_dataset(data, labels, train_qrels, cfg)
    assert set(dataset) == {"hard_negatives", "pairs"}
    assert dataset["hard_negatives"].column_names == ["anchor", "positive", "negative_1", "negative_2"]
    assert dataset["pairs"].column_names == ["anchor", "positive"]
    assert len(dataset["hard_negatives"]) + len(dataset["pairs"]) == len(train_qrels)  # no dev query
    log = train(cfg)
    assert log["n_train_rows"] == len(train_qrels) and (run_dir / "model" / "modules.json").exists()


def test_sequence_cap_never_exceeds_the_model_limit(minilm_path):
    model, _ = load_for_training(TrainConfig(base_model=minilm_path, data_dir="d", run_dir="r"))
    assert model.max_seq_length == 256  # MiniLM's own limit, under the 512 cap
    model, _ = load_for_training(TrainConfig(base_model=minilm_path, data_dir="d", run_dir="r", max_seq_length=64))
    assert model.max_seq_length == 64
