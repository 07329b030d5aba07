"""Training on the tiny Qwen3 model: outputs, merge, slerp, 4-bit gradients, resume, DDP."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SAMPLES
from embtune.data import load_beir
from embtune.encode import encode
from embtune.merge import slerp, slerp_models
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


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    log = train(config(tiny_models[0], run_dir, merge_dtype="float32"))
    return run_dir, log


def test_training_writes_adapter_model_and_log(trained):
    run_dir, log = trained
    assert (run_dir / "adapter" / "adapter_config.json").exists()
    assert "sentence-transformers + peft" in log["backend"] and "LoRA r=16" in log["backend"]
    saved = json.loads((run_dir / "train_log.json").read_text())
    assert [p["step"] for p in saved["eval_curve"]] == [3, 6]
    assert saved["loss_curve"] and saved["seconds"] > 0 and saved["peak_memory_mb"] > 0
    assert saved["n_dev_queries"] == 69  # pydocs has a dev split
    assert (run_dir / "train_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert saved["merge_with_base"] == 1.0 and not (run_dir / "finetuned").exists()  # human labels: as trained


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
    assert "Instruct: Given a web search query" in out and "left" in out and "(1, 64)" in out
    card = (run_dir / "model" / "README.md").read_text()
    assert "sentence-transformers" in card


def test_merge_equals_adapter_and_changes_the_model(trained, tiny_embedding):
    run_dir, _ = trained
    merged = encode(load_embedder(str(run_dir / "model"), device="cpu"), TEXTS, progress=False)
    adapter = encode(load_embedder(str(run_dir / "adapter"), device="cpu"), TEXTS, progress=False)
    base = encode(load_embedder(str(tiny_embedding), device="cpu"), TEXTS, progress=False)
    np.testing.assert_allclose(merged, adapter, atol=1e-4)
    assert np.abs(merged - base).max() > 1e-2  # the LoRA update really landed in the weights


def test_slerp_interpolates_on_the_sphere(trained, tiny_embedding):
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    mid = slerp(a, b, 0.5)
    assert torch.allclose(mid, torch.tensor([1.0, 1.0]) / 2**0.5 * 1.5, atol=1e-6)  # angle halved, norm mean
    assert torch.equal(slerp(a, b, 0.0), a) and torch.allclose(slerp(a, b, 1.0), b)
    run_dir, _ = trained
    base = encode(load_embedder(str(tiny_embedding), device="cpu"), TEXTS, progress=False)
    tuned = encode(load_embedder(str(run_dir / "model"), device="cpu"), TEXTS, progress=False)
    at0 = encode(slerp_models(tiny_embedding, run_dir / "model", 0.0), TEXTS, progress=False)
    at1 = encode(slerp_models(tiny_embedding, run_dir / "model", 1.0), TEXTS, progress=False)
    half = encode(slerp_models(tiny_embedding, run_dir / "model", 0.5), TEXTS, progress=False)
    np.testing.assert_allclose(at0, base, atol=1e-5)
    np.testing.assert_allclose(at1, tuned, atol=1e-5)
    assert 0 < np.abs(half - base).max() < np.abs(tuned - base).max()


def test_synthetic_only_training_is_merged_half_way_with_the_base(tmp_path, tiny_embedding):
    data_dir = tmp_path / "data"
    (data_dir / "qrels").mkdir(parents=True)
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):  # no train labels
        shutil.copy(SAMPLES / "pydocs" / name, data_dir / name)
    run_dir = tmp_path / "run"
    model = load_embedder(str(tiny_embedding), device="cpu")
    generate(model, str(tiny_embedding), load_beir(data_dir, limits="off"), run_dir,
             SynthConfig(generator="ict", round_trip_k=None))  # fmt: skip
    log = train(config(tiny_embedding, run_dir, data_dir=str(data_dir), merge_dtype="float32"))
    assert log["merge_with_base"] == 0.5 and log["finetuned_model"] == str(run_dir / "finetuned")
    finetuned = load_embedder(str(run_dir / "finetuned"), device="cpu")
    merged = load_embedder(str(run_dir / "model"), device="cpu")
    expected = encode(slerp_models(tiny_embedding, run_dir / "finetuned", 0.5), TEXTS, progress=False)
    np.testing.assert_allclose(encode(merged, TEXTS, progress=False), expected, atol=1e-5)
    assert merged.prompts == finetuned.prompts


def test_lora_gradients_through_4bit_match_dequantised(tiny_embedding):
    """bitsandbytes warns on the CPU that a 4-bit kernel has no autograd registration: check the LoRA
    gradients through the 4-bit weights against the same LoRA on the de-quantised weights, after an eval
    forward like the dev evaluation (which used to switch bitsandbytes to that kernel for good)."""
    import bitsandbytes as bnb

    from embtune.losses import Qwen3InfoNCELoss

    quantised, description = load_for_training(config(tiny_embedding, "unused", quant="4bit", lora_dropout=0.0))
    assert "4bit" in description
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
        assert rel < 0.05, f"{name}: 4-bit and de-quantised LoRA gradients differ by {rel:.1%}"


def _train_args(tiny_embedding, run_dir, max_steps):
    return [
        "-m",
        "embtune.train",
        f"--base_model={tiny_embedding}",
        f"--data_dir={SAMPLES / 'pydocs'}",
        f"--run_dir={run_dir}",
        f"--max_steps={max_steps}",
        "--eval_steps=2",
        "--batch_size=8",
        "--max_seq_length=64",
        "--eval_corpus_size=100",
        "--full_finetune=false",
    ]


def test_resume_after_kill(tmp_path, tiny_embedding):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, *_train_args(tiny_embedding, run_dir, 40)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while not (run_dir / "checkpoints" / "checkpoint-4" / "trainer_state.json").exists():
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # an interruption mid-run, like a lost Colab session
    proc.wait()
    assert not (run_dir / "model").exists()
    (run_dir / "checkpoints" / "checkpoint-999").mkdir()  # as a kill in the middle of saving leaves one
    done = subprocess.run(
        [sys.executable, *_train_args(tiny_embedding, run_dir, 40)], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    resumed = next(line for line in done.stdout.splitlines() if line.startswith("resuming from"))
    assert int(resumed.rsplit("-", 1)[1]) >= 4 and not (run_dir / "checkpoints" / "checkpoint-999").exists()
    state = json.loads(
        max((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        .joinpath("trainer_state.json")
        .read_text()
    )
    assert state["global_step"] == 40
    assert (run_dir / "model" / "model.safetensors").exists()


def test_ddp_two_cpu_processes(tmp_path, tiny_embedding):
    """The training entry point runs unchanged under torchrun (2 processes, gloo, negatives gathered)."""
    run_dir = tmp_path / "run"
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node=2", "--master_port=29533"]
    done = subprocess.run(
        [*torchrun, *_train_args(tiny_embedding, run_dir, 4)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = json.loads((run_dir / "train_log.json").read_text())
    assert log["world_size"] == 2 and log["loss_curve"] and (run_dir / "model" / "model.safetensors").exists()


def test_plan_full_for_small_models_lora_for_large(tmp_path, minilm_path):
    """Decided from the config before loading: MiniLM is fully fine-tuned; the Qwen3-Embedding-0.6B shape
    gets LoRA (4-bit where there is a GPU)."""
    from transformers import Qwen3Config

    from embtune.train import plan

    big = tmp_path / "qwen3-0.6b-shape"
    Qwen3Config(
        vocab_size=151_669,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
    ).save_pretrained(big)
    small = plan(TrainConfig(base_model=minilm_path, data_dir="d", run_dir="r"), minilm_path)
    large = plan(TrainConfig(base_model=str(big), data_dir="d", run_dir="r"), str(big))
    assert small.full_finetune and small.quant == "none" and small.approx_params < 50e6
    assert not large.full_finetune and 4e8 < large.approx_params < 8e8
    assert large.quant == ("4bit" if torch.cuda.is_available() else "none")
    with pytest.raises(ValueError, match="full fine-tuning needs quant='none'"):
        plan(TrainConfig(base_model="m", data_dir="d", run_dir="r", quant="4bit", full_finetune=True), str(big))


def test_trains_on_hard_negatives_with_short_rows_apart(tmp_path, tiny_embedding):
    """Rows the filters left with fewer than max_negatives negatives train on in-batch negatives, in their own set;
    dev queries never enter training."""
    from embtune.data import load_beir, training_labels
    from embtune.train import split_train_dev, training_dataset

    run_dir = tmp_path / "run"
    (run_dir / "hard_negatives").mkdir(parents=True)
    data = load_beir(SAMPLES / "pydocs")
    cfg = config(tiny_embedding, run_dir, max_negatives=2, max_steps=3)
    labels = training_labels(data, run_dir)
    train_qrels, dev_qrels = split_train_dev(data, labels, cfg)
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
    (run_dir / "hard_negatives" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
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
