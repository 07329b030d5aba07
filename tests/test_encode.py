import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from embtune.encode import WEB_SEARCH_TASK, encode, instruct, query_prompt, truncate, uses_last_token
from embtune.models import load_embedder

QUERIES = ["What is the capital of China?", "Explain gravity"]
DOCS = [
    "The capital of China is Beijing.",
    "Gravity is a force that attracts two bodies towards each other. It gives weight to physical objects.",
    "短文本",
]


def official_qwen3_embeddings(model_dir, texts):
    """Independent re-implementation of the Qwen3-Embedding model card's transformers snippet."""

    def last_token_pool(last_hidden_states, attention_mask):
        left_padding = attention_mask[:, -1].sum() == attention_mask.shape[0]
        if left_padding:
            return last_hidden_states[:, -1]
        sequence_lengths = attention_mask.sum(dim=1) - 1
        return last_hidden_states[torch.arange(last_hidden_states.shape[0]), sequence_lengths]

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModel.from_pretrained(model_dir).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=8192, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**batch)
    return F.normalize(last_token_pool(outputs.last_hidden_state, batch["attention_mask"]), p=2, dim=1).numpy()


def test_parity_with_official_qwen3_snippet(tiny_embedding):
    task = "Given a web search query, retrieve relevant passages that answer the query"
    expected = official_qwen3_embeddings(tiny_embedding, [f"Instruct: {task}\nQuery:{q}" for q in QUERIES] + DOCS)
    model = load_embedder(str(tiny_embedding), device="cpu")
    ours = np.vstack([encode(model, QUERIES, "query", task), encode(model, DOCS, "document")])
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_instruction_on_queries_only(tiny_embedding):
    model = load_embedder(str(tiny_embedding), device="cpu")
    assert query_prompt(model) == instruct(WEB_SEARCH_TASK)  # the model's shipped prompt, as Qwen3 ships it
    as_query, as_doc = encode(model, QUERIES, "query"), encode(model, QUERIES, "document")
    assert not np.allclose(as_query, as_doc, atol=1e-4)
    np.testing.assert_allclose(encode(model, QUERIES, "query", instruction=""), as_doc, atol=1e-6)
    custom = encode(model, QUERIES, "query", instruction="Find Python docs")
    np.testing.assert_allclose(
        custom,
        official_qwen3_embeddings(tiny_embedding, [f"Instruct: Find Python docs\nQuery:{q}" for q in QUERIES]),
        atol=1e-5,
    )


def test_exactly_one_end_token_and_left_padding(tiny_embedding, tmp_path):
    """A tokenizer that neither appends <|endoftext|> nor pads left (as early Qwen3 copies) is fixed."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_embedding, broken)
    model = load_embedder(str(broken), device="cpu")
    model.tokenizer.backend_tokenizer.post_processor = None
    model.tokenizer.padding_side = "right"
    end_id = model.tokenizer.convert_tokens_to_ids("<|endoftext|>")

    reference = encode(model, DOCS, "document")  # encode() repairs the tokenizer first
    assert model.tokenizer.padding_side == "left"
    ids = model.tokenizer(DOCS[0])["input_ids"]
    assert ids[-1] == end_id and ids[-2] != end_id
    # A text that already ends with the token gets no second one.
    np.testing.assert_allclose(encode(model, [DOCS[0] + "<|endoftext|>"]), reference[:1], atol=1e-6)
    # The token survives truncation.
    model.max_seq_length = 8
    assert model.preprocess([DOCS[1]])["input_ids"][0, -1].item() == end_id
    model.max_seq_length = 256
    np.testing.assert_allclose(reference, official_qwen3_embeddings(tiny_embedding, DOCS), atol=1e-5)


def test_batch_invariance_with_left_padding(tiny_embedding):
    model = load_embedder(str(tiny_embedding), device="cpu")
    alone = encode(model, DOCS[:1], batch_size=1)
    batched = encode(model, DOCS, batch_size=3)
    np.testing.assert_allclose(alone[0], batched[0], atol=1e-5)
    assert np.allclose(np.linalg.norm(batched, axis=1), 1, atol=1e-5)


def test_other_models_keep_their_pooling_and_get_no_instruction(minilm):
    assert not uses_last_token(minilm)
    assert minilm[1].pooling_mode == "mean"
    assert query_prompt(minilm) == ""
    np.testing.assert_allclose(encode(minilm, QUERIES, "query"), encode(minilm, QUERIES, "document"), atol=1e-6)
    reference = minilm.encode(QUERIES, normalize_embeddings=True)
    np.testing.assert_allclose(encode(minilm, QUERIES, "query"), reference, atol=1e-5)
    assert not np.allclose(encode(minilm, QUERIES, "query", "Find facts"), reference, atol=1e-3)


def test_matryoshka_truncation_renormalises(minilm):
    full = encode(minilm, DOCS)
    cut = encode(minilm, DOCS, dim=64)
    assert cut.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(cut, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(cut, full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(truncate(full, None), full, atol=1e-6)
    with pytest.raises(ValueError, match="outside 1..384"):
        truncate(full, 1024)
