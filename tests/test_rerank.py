"""Reranker scoring: Qwen3-Reranker's official template and P(yes), against the model card's own code."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import write_beir
from embtune.mine import save
from embtune.rerank import CHAT_TEMPLATE, load_reranker, rerank
from embtune.rundir import data_fingerprint, make_manifest

# Qwen3-Reranker's model card (Qwen/Qwen3-Reranker-0.6B, "Transformers Usage"), copied as written there.
PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


def format_instruction(instruction, query, doc):
    if instruction is None:
        instruction = DEFAULT_INSTRUCTION
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}"

PAIRS = [
    ("what is x", "x is y"),
    ("how do I sort a list in python", "Use sorted(). It returns a new list and leaves the original alone."),
    ("capital of France", "Paris is the capital and most populous city of France."),
]


def official_scores(path, pairs, instruction=None, max_length=8192):
    """Qwen3-Reranker's model-card snippet, written out independently of embtune.rerank."""
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    prefix = tokenizer.encode(PREFIX, add_special_tokens=False)
    suffix = tokenizer.encode(SUFFIX, add_special_tokens=False)
    texts = [format_instruction(instruction, q, d) for q, d in pairs]
    inputs = tokenizer(texts, padding=False, truncation="longest_first", return_attention_mask=False,
                       max_length=max_length - len(prefix) - len(suffix))  # fmt: skip
    inputs["input_ids"] = [prefix + ids + suffix for ids in inputs["input_ids"]]
    inputs = tokenizer.pad(inputs, padding=True, return_tensors="pt", max_length=max_length)
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1, :]
    return torch.stack([logits[:, no], logits[:, yes]], 1).log_softmax(1)[:, 1].exp().numpy()


def test_template_and_yes_no_tokens(tiny_models):
    model = load_reranker(str(tiny_models[1]), device="cpu")
    tokenizer = model[0].processor
    messages = [{"role": "query", "content": "Q?"}, {"role": "document", "content": "D."}]
    expected = PREFIX + format_instruction(None, "Q?", "D.") + SUFFIX
    assert tokenizer.apply_chat_template(messages, tokenize=False) == expected
    custom = [{"role": "system", "content": "Find code"}, *messages]
    assert "<Instruct>: Find code\n<Query>: Q?" in tokenizer.apply_chat_template(custom, tokenize=False)
    score = model[-1]
    assert (score.true_token_id, score.false_token_id) == tuple(tokenizer.convert_tokens_to_ids(["yes", "no"]))
    assert model[0].tokenizer.padding_side == "left"


def test_scores_equal_the_official_snippet(tiny_models):
    path = str(tiny_models[1])
    model = load_reranker(path, device="cpu")
    np.testing.assert_allclose(model.predict(PAIRS, batch_size=2), official_scores(path, PAIRS), atol=1e-5)
    custom = model.predict(PAIRS, prompt="Find the answer")
    np.testing.assert_allclose(custom, official_scores(path, PAIRS, "Find the answer"), atol=1e-5)
    # the instruction argument of rerank(): None the model's own, "" an empty instruct line, else the task
    run = {"q": {f"d{i}": 1.0 for i in range(len(PAIRS))}}
    docs = {f"d{i}": d for i, (_, d) in enumerate(PAIRS)}
    for instruction in (None, "", "Find the answer"):
        reranked = rerank(model, {"q": PAIRS[0][0]}, run, docs, instruction=instruction)["q"]
        expected = official_scores(path, [(PAIRS[0][0], d) for d in docs.values()], instruction)
        np.testing.assert_allclose([reranked[d] for d in docs], expected, atol=1e-5)


def test_a_causal_lm_without_a_pad_token_scores_batches(tiny_models, tmp_path):
    """SmolLM2 and other chat LMs ship no pad token; batched scores must equal the official snippet's."""
    import shutil

    path = tmp_path / "no-pad"
    shutil.copytree(tiny_models[1], path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(path)
    assert AutoTokenizer.from_pretrained(path).pad_token is None
    model = load_reranker(str(path), device="cpu")
    np.testing.assert_allclose(model.predict(PAIRS, batch_size=3), official_scores(tiny_models[1], PAIRS), atol=1e-5)


def test_rerank_rescores_the_top_of_a_run(tiny_models):
    model = load_reranker(str(tiny_models[1]), device="cpu")
    queries = {"q": PAIRS[1][0]}
    docs = {f"d{i}": d for i, (_, d) in enumerate(PAIRS)}
    run = {"q": {"d0": 0.9, "d1": 0.8, "d2": 0.1}}
    out = rerank(model, queries, run, docs, top_k=2)
    assert set(out["q"]) == {"d0", "d1", "d2"}
    assert out["q"]["d2"] < min(out["q"]["d0"], out["q"]["d1"])  # below the cut: kept, under the reranked ones
    expected = official_scores(str(tiny_models[1]), [(queries["q"], docs["d0"]), (queries["q"], docs["d1"])])
    np.testing.assert_allclose([out["q"]["d0"], out["q"]["d1"]], expected, atol=1e-5)


def rerank_config(model, data, run, **overrides):
    from embtune.rerank_train import RerankConfig

    return RerankConfig(reranker_model=str(model), base_model=str(model), data_dir=str(data), run_dir=str(run),
                        batch_size=8, **overrides)  # fmt: skip


@pytest.fixture
def planted_run(tmp_path):
    """Six queries, each with its relevant document and three others mined as negatives (notebook 02's format)."""
    topics = ["tower paris iron", "cell energy atp", "rust memory safety", "binary search sorted",
              "coffee roasted beans", "volcano magma lava"]  # fmt: skip
    docs = {f"d{i}": f"A document about {t}." for i, t in enumerate(topics)}
    queries = {f"q{i}": f"question on {t}" for i, t in enumerate(topics)}
    corpus = "\n".join(json.dumps({"_id": d, "text": t}) for d, t in docs.items())
    qs = "\n".join(json.dumps({"_id": q, "text": t}) for q, t in queries.items())
    qrels = "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(6))
    data = write_beir(tmp_path / "data", corpus, qs, {"train": qrels})
    rows = []
    for i in range(6):
        negatives = [f"d{(i + k) % 6}" for k in (1, 2, 3)]
        rows.append({"query_id": f"q{i}", "query": queries[f"q{i}"], "positive_id": f"d{i}", "positive": docs[f"d{i}"],
                     "negative_ids": negatives, "negatives": [docs[n] for n in negatives],
                     "positive_score": 0.5, "negative_scores": [0.1] * 3})  # fmt: skip
    save(rows, {"made_from": make_manifest({"data": data_fingerprint(data)}, {})}, tmp_path / "run")  # as 02 saves
    return data, tmp_path / "run", queries, docs


def _rank_of_positive(model, queries, docs):
    """The positive's rank (1 = top) among itself and its three mined negatives, for each query."""
    ranks = []
    for i, q in enumerate(queries.values()):
        candidates = [docs[f"d{(i + k) % 6}"] for k in range(4)]  # the positive first
        scores = model.predict([(q, d) for d in candidates], show_progress_bar=False)
        ranks.append(int((scores > scores[0]).sum()) + 1)
    return ranks


def test_planted_relevant_documents_move_up_after_training(tiny_models, planted_run):
    from embtune.rerank_train import train_reranker

    data, run, queries, docs = planted_run
    before = _rank_of_positive(load_reranker(str(tiny_models[1]), device="cpu"), queries, docs)
    config = rerank_config(tiny_models[1], data, run, max_steps=150, learning_rate=3e-3)
    log = train_reranker(config)
    assert log["n_rows"] == 6 * 4 and log["n_positive"] == 6 and "full fine-tuning" in log["backend"]
    assert log["pos_weight"] == 3.0  # three negatives per positive: both classes weigh alike in the loss
    after = _rank_of_positive(load_reranker(str(run / "reranker" / "model"), device="cpu"), queries, docs)
    # Every planted document ranks at least as high as before and most reach the top. Not all: the last steps
    # differ with the CPU thread count (reduction order), and one query may end a rank short.
    assert all(a <= b for a, b in zip(after, before, strict=True)) and sum(after) < sum(before), (before, after)
    assert after.count(1) >= 5, (before, after)
    # the template travels with the model
    assert (run / "reranker" / "model" / "chat_template.jinja").read_text() == CHAT_TEMPLATE


def test_lora_merge_equals_the_adapter_and_changes_the_model(tiny_models, planted_run):
    from sentence_transformers import CrossEncoder

    from embtune.rerank_train import train_reranker

    data, run, queries, docs = planted_run
    config = rerank_config(tiny_models[1], data, run, full_finetune=False, max_steps=10, learning_rate=1e-2)
    train_reranker(config)
    pairs = [(q, d) for q in queries.values() for d in list(docs.values())[:2]]
    adapter = load_reranker(str(run / "reranker" / "adapter"), device="cpu")
    merged = CrossEncoder(str(run / "reranker" / "model"), device="cpu")  # plain sentence-transformers
    base = load_reranker(str(tiny_models[1]), device="cpu")
    np.testing.assert_allclose(merged.predict(pairs), adapter.predict(pairs), atol=1e-4)
    assert np.abs(merged.predict(pairs) - base.predict(pairs)).max() > 1e-3


def test_unsloth_backend_trains_4bit_lora_and_merges(tiny_models, planted_run):
    """unsloth's FastLanguageModel path (its CPU fallback here, 4-bit included), in a process of its own:
    importing unsloth patches transformers for the whole process."""
    import subprocess
    import sys

    from sentence_transformers import CrossEncoder

    data, run, queries, docs = planted_run
    config = rerank_config(tiny_models[1], data, run, backend="unsloth", quant="4bit", full_finetune=False,
                           max_steps=10, learning_rate=1e-2)  # fmt: skip
    script = (
        "import sys; from embtune.rerank_train import RerankConfig, train_reranker\n"
        "log = train_reranker(RerankConfig(**eval(sys.argv[1])))\n"
        "print('BACKEND', log['backend'])\n"
    )
    out = subprocess.run([sys.executable, "-c", script, repr(dataclasses.asdict(config))], capture_output=True,
                         text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "BACKEND causal LM, P(yes) | unsloth | 4bit | LoRA r=16" in out.stdout
    pairs = [(q, d) for q in queries.values() for d in list(docs.values())[:2]]
    adapter = load_reranker(str(run / "reranker" / "adapter"), device="cpu")
    merged = CrossEncoder(str(run / "reranker" / "model"), device="cpu")
    base = load_reranker(str(tiny_models[1]), device="cpu")
    np.testing.assert_allclose(merged.predict(pairs), adapter.predict(pairs), atol=1e-4)
    assert np.abs(merged.predict(pairs) - base.predict(pairs)).max() > 1e-3


def test_unsloth_backend_refuses_a_cross_encoder(minilm_path, planted_run):
    from embtune.rerank_train import load_for_training

    data, run, _, _ = planted_run
    with pytest.raises(ValueError, match="backend='peft'"):
        load_for_training(rerank_config(minilm_path, data, run, backend="unsloth"))
