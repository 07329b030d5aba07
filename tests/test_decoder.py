"""A causal LM turned into a last-token embedder (embtune.decoder) on the tiny Qwen3ForCausalLM fixture."""

import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Pooling

from embtune.decoder import embedder_from_causal_lm
from embtune.encode import WEB_SEARCH_TASK, encode, end_token, instruct
from embtune.models import load_embedder

TEXTS = ["how to sort a list", "sorted returns a new sorted list from the items in iterable", "open"]


@pytest.fixture(scope="module")
def built(tiny_models, tmp_path_factory):
    return embedder_from_causal_lm(tiny_models[1], tmp_path_factory.mktemp("decoder") / "embedder")


def test_plain_sentence_transformers_loads_a_left_padded_last_token_embedder(built):
    model = SentenceTransformer(str(built), device="cpu")
    pooling = [m for m in model if isinstance(m, Pooling)]
    assert [p.pooling_mode for p in pooling] == ["lasttoken"]
    assert model.tokenizer.padding_side == "left"
    assert model.prompts["query"] == instruct(WEB_SEARCH_TASK) and model.prompts["document"] == ""
    end_id = model.tokenizer.convert_tokens_to_ids(end_token(model.tokenizer))
    assert model.tokenizer.pad_token_id != end_id
    for text in TEXTS:
        ids = model.tokenizer(text)["input_ids"]
        assert ids[-1] == end_id and ids.count(end_id) == 1
    truncated = model.tokenizer(TEXTS[1] * 20, truncation=True, max_length=8)["input_ids"]
    assert len(truncated) == 8 and truncated[-1] == end_id, "truncation must keep the end token"
    batch = model.tokenizer(TEXTS, padding=True)
    assert [row[0] for row in batch["attention_mask"]][:2] == [0, 1], "the shorter text is padded on the left"


def test_embeddings_are_the_last_token_of_the_base_model_hidden_states(built, tiny_models):
    """A hand-written last-token pooling of the causal LM's base model (AutoModel, no LM head): the text's tokens,
    one end token, left padding, the hidden state at the last position, L2-normalised."""
    from transformers import AutoModel, AutoTokenizer

    model = SentenceTransformer(str(built), device="cpu")
    got = model.encode(TEXTS, convert_to_tensor=True, batch_size=len(TEXTS))

    tokenizer = AutoTokenizer.from_pretrained(tiny_models[1])
    base = AutoModel.from_pretrained(tiny_models[1]).eval()
    end_id = tokenizer.convert_tokens_to_ids(end_token(tokenizer))
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] + [end_id] for t in TEXTS]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        hidden = base(input_ids=ids, attention_mask=mask).last_hidden_state[:, -1]
    expected = torch.nn.functional.normalize(hidden, dim=-1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_embtune_loads_it_unchanged(built):
    """embtune's prepare() finds the end token in place and leaves the folder's tokenizer alone."""
    plain = SentenceTransformer(str(built), device="cpu")
    ours = load_embedder(str(built), device="cpu")
    assert ours.tokenizer(TEXTS)["input_ids"] == plain.tokenizer(TEXTS)["input_ids"]
    a = encode(ours, TEXTS, "query", progress=False)
    b = plain.encode(TEXTS, prompt=plain.prompts["query"], normalize_embeddings=True)
    assert abs(a - b).max() < 1e-5


def test_a_chat_lm_becomes_an_embedder_of_plain_text(tiny_models, tmp_path):
    """A chat LM's tokenizer carries a chat template; sentence-transformers would render every plain text through
    it (its `message` modality), which no server does. The embedder tokenizes the text as it is, as servers do."""
    import json
    import shutil

    chat = tmp_path / "chat-lm"
    shutil.copytree(tiny_models[1], chat)
    config = json.loads((chat / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    (chat / "tokenizer_config.json").write_text(json.dumps(config))
    model = SentenceTransformer(str(embedder_from_causal_lm(chat, tmp_path / "embedder")), device="cpu")
    assert set(model[0].modality_config) == {"text"}
    features = model.tokenize([TEXTS[0]]) if hasattr(model, "tokenize") else model.preprocess([TEXTS[0]])
    assert features["input_ids"][0].tolist() == model.tokenizer(TEXTS[0])["input_ids"]  # no <|im_start|>user

