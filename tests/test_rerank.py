"""Reranker scoring: Qwen3-Reranker's official template and P(yes), against the model card's own code."""

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from embtune.encode import WEB_SEARCH_TASK
from embtune.rerank import PREFIX, SUFFIX, format_pair, load_reranker, rerank

PAIRS = [
    ("what is x", "x is y"),
    ("how do I sort a list in python", "Use sorted(). It returns a new list and leaves the original alone."),
    ("capital of France", "Paris is the capital and most populous city of France."),
]


def official_scores(path, pairs, instruction=WEB_SEARCH_TASK, max_length=8192):
    """Qwen3-Reranker's model-card snippet, written out independently of embtune.rerank's template."""
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    prefix = tokenizer.encode(PREFIX, add_special_tokens=False)
    suffix = tokenizer.encode(SUFFIX, add_special_tokens=False)
    texts = [f"<Instruct>: {instruction}\n<Query>: {q}\n<Document>: {d}" for q, d in pairs]
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
    assert tokenizer.apply_chat_template(messages, tokenize=False) == PREFIX + format_pair("Q?", "D.") + SUFFIX
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


def test_rerank_rescores_the_top_of_a_run(tiny_models):
    model = load_reranker(str(tiny_models[1]), device="cpu")
    queries = {"q": PAIRS[1][0]}
    docs = {f"d{i}": d for i, (_, d) in enumerate(PAIRS)}
    run = {"q": {"d0": 0.9, "d1": 0.8, "d2": 0.1}}
    out = rerank(model, queries, run, docs, top_k=2)
    assert set(out["q"]) == {"d0", "d1"}
    expected = official_scores(str(tiny_models[1]), [(queries["q"], docs["d0"]), (queries["q"], docs["d1"])])
    np.testing.assert_allclose([out["q"]["d0"], out["q"]["d1"]], expected, atol=1e-5)
