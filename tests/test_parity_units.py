"""embtune.serving's parts that need no server and no second process, in process and in seconds: the diagnosis
(`_cause`), the top-k agreement with near-ties, the re-encodings the hypotheses are made of (against plain
sentence-transformers), the fixed texts, the report table. `make mutate MODULE=serving` runs these per mutant;
the checks end to end (a reference in its own process, real servers) are in test_export.py."""

import numpy as np
import pytest

from embtune import serving
from embtune.serving import Parity, _cause, _top_k_agreement, hypotheses, table


@pytest.fixture(scope="module")
def tiny(tiny_embedding):
    from embtune.models import load_embedder

    return load_embedder(str(tiny_embedding), device="cpu")


def test_a_hypothesis_is_named_where_it_explains_the_gap_not_a_sliver_of_it():
    """Measured on SmolLM2's dynamic int8 export (int8 arithmetic): min cosine 0.6106, median 0.9962, and the
    query prompt on every text 0.6626: outliers of imprecise arithmetic, not that mistake. A partial explanation
    that closes most of the gap is still named (the stale SmolLM2 run: 0.688 -> 0.990 at 128 tokens)."""
    noise = {"as trained": 0.6106, "query prompt on every text": 0.6626, "pooling: mean": 0.41}
    assert _cause(noise, 0.99).startswith("precision: no known mistake explains it better than the model as "
                                          "trained (min cosine 0.6106)")  # fmt: skip
    named = _cause({**noise, "query prompt on every text": 0.82}, 0.99)
    assert named == ("query prompt on every text (explains it only in part: min cosine 0.8200): "
                     + serving.FIXES["query prompt on every text"])  # fmt: skip
    partial = {"as trained": 0.688, "truncation: at 128 tokens": 0.990}
    assert _cause(partial, 0.999).startswith("truncation: at 128 tokens (explains it only in part")
    whole = _cause({"as trained": 0.99, "end token missing": 0.9995}, 0.999)
    assert whole == f"end token missing: {serving.FIXES['end token missing']}"
    assert _cause({"as trained": 0.99, "pooling: mean": 0.999}, 0.999).endswith(serving.FIXES["pooling"])
    # exactly half the gap is not enough; just over half is
    assert _cause({"as trained": 0.9, "pooling: mean": 0.95}, 0.999).startswith("precision")
    assert _cause({"as trained": 0.9, "pooling: mean": 0.951}, 0.999).startswith("pooling: mean")
    assert _cause({"as trained": 0.99, "pooling: mean": 0.98}, 0.95).startswith("precision")


def test_top_k_agreement_forgives_near_ties_at_the_cut_and_nothing_else():
    """Two queries over six candidates, top 3: the first swaps rank 3 and 4, which the model scores 0.001 apart
    (a near-tie at tie 0.01; a real difference at tie 0.0001); the second swaps rank 1 and 6. The overlap counts
    the sets as they are (2 of 3 each), near-ties or not."""
    ref = np.array([[0.9, 0.8, 0.700, 0.699, 0.1, 0.0], [0.9, 0.8, 0.7, 0.6, 0.5, 0.1]])
    got = np.array([[0.9, 0.8, 0.699, 0.700, 0.1, 0.0], [0.1, 0.8, 0.7, 0.6, 0.5, 0.9]])
    assert _top_k_agreement(ref, got, tie=0.01, k=3) == (0.5, 0.6667)
    assert _top_k_agreement(ref, got, tie=0.0001, k=3) == (0.0, 0.6667)
    assert _top_k_agreement(ref, ref, tie=0.0, k=3) == (1.0, 1.0)


def test_the_report_table_has_a_row_per_check_with_its_numbers():
    rows = [Parity("onnx", "embedder", "float", 0.999, 24, 40, min_cosine=0.9999912, median_cosine=1.0,
                   identical=1.0, passed=True),
            Parity("model-f16.gguf", "reranker", "int8", 0.05, 24, 240, max_abs_diff=0.01234, min_spearman=0.98765,
                   identical=0.5, cause="scores differ"),
            Parity("http://x", "embedder", "float", 0.999, 24, 40, error="unreachable")]  # fmt: skip
    lines = table(rows).splitlines()
    assert lines[:2] == ["| target | precision | min cos | median cos | max abs diff | min spearman | identical top-k "
                         "| passed | cause |", "|---|---|---|---|---|---|---|---|---|"] and len(lines) == 5  # fmt: skip
    assert lines[2] == "| onnx | float | 0.99999 | 1.00000 |  |  | 100% | yes |  |"
    assert lines[3] == "| model-f16.gguf | int8 |  |  | 0.0123 | 0.9877 | 50% | no | scores differ |"
    assert lines[4].endswith("| 0% | no | unreachable |")


def test_the_fixed_texts_cover_short_medium_truncated_and_other_scripts(tiny):
    docs = serving.documents(tiny.tokenizer, 32, n=12)
    assert len(docs) == 12 and docs[-1].startswith("函数") and docs[-2].startswith("Ausnahmen")
    words = [len(d.split()) for d in docs[:10]]
    assert words[0] == words[2] == 12 and words[1] == words[3] == 80  # i % 5: 0, 2 short; 1, 3 medium
    for long in (docs[4], docs[9]):  # cut 64 tokens past the model's length, so that it is truncated
        assert len(tiny.tokenizer(long, add_special_tokens=False)["input_ids"]) == pytest.approx(32 + 64, abs=2)
    pairs = serving.rerank_pairs(4)
    assert len(pairs) == len(serving.QUERIES) and all(len(c) == 4 for _, c in pairs)
    assert pairs[1][1][0] == pairs[0][1][3]  # each query's candidates start three documents further


def test_the_hypotheses_of_a_last_token_model_with_a_query_prompt(tiny):
    prompt = tiny.prompts["query"]
    half = tiny.max_seq_length // 2
    assert hypotheses(tiny, prompt) == {
        "instruction missing": {"drop_prompt": True}, "query prompt on every text": {"prompt_everywhere": True},
        "pooling: mean": {"pooling": "mean"}, "pooling: first token": {"pooling": "cls"},
        "padding side: right, last position read": {"right_padding": True}, "end token missing": {"end_token": False},
        f"truncation: at {half} tokens": {"max_length": half}, "truncation: none": {"max_length": None},
        "truncation: after the end token was added, cutting it": {"cut_after_end": True}}  # fmt: skip
    assert isinstance(half, int)
    assert "instruction missing" not in hypotheses(tiny, "")
    assert serving.pooling_mode(tiny) == "lasttoken" and serving.llama_pooling(tiny) == "last"


def test_each_re_encoding_changes_its_one_thing_and_nothing_else(tiny):
    """With nothing changed, `_variant` is plain sentence-transformers' encoding (queries with the prompt); each
    option changes what it names: the prompt dropped equals encoding the bare query, and so on."""
    prompt = tiny.prompts["query"]
    queries = ["how do I sort a list", "what is a tuple"]
    docs = ["sorted returns a new list " * 3, "a tuple is an immutable sequence", "x"]
    sent = [[prompt + q for q in queries], docs]

    def st(texts, **kw):
        return tiny.encode(texts, normalize_embeddings=True, **kw)

    same = serving._variant(tiny, sent, 2, prompt)
    np.testing.assert_allclose(same, np.vstack([st(sent[0]), st(docs)]), atol=1e-5)
    dropped = serving._variant(tiny, sent, 2, prompt, drop_prompt=True)
    np.testing.assert_allclose(dropped[:2], st(queries), atol=1e-5)
    np.testing.assert_allclose(dropped[2:], same[2:], atol=1e-6)  # documents untouched
    everywhere = serving._variant(tiny, sent, 2, prompt, prompt_everywhere=True)
    np.testing.assert_allclose(everywhere[2:], st([prompt + d for d in docs]), atol=1e-5)
    for option in ({"pooling": "mean"}, {"right_padding": True}, {"end_token": False}):
        assert np.abs(serving._variant(tiny, sent, 2, prompt, **option) - same).max() > 1e-3, option
    short = serving._variant(tiny, sent, 2, prompt, max_length=4)
    np.testing.assert_allclose(short[4], same[4], atol=1e-6)  # "x" is shorter than 4 tokens
    assert np.abs(short[3] - same[3]).max() > 1e-3  # "a tuple is an immutable sequence" is cut
    assert np.allclose(np.linalg.norm(same, axis=1), 1)


def test_the_small_helpers():
    from sentence_transformers.sentence_transformer.modules import Pooling

    for mode, flag in (("lasttoken", "last"), ("mean", "mean"), ("cls", "cls"), ("max", "mean")):
        assert serving.llama_pooling([Pooling(8, mode)]) == flag, mode  # llama-server has no max: its default
    assert serving.llama_pooling([]) == "mean" and serving.pooling_mode([]) is None

    def served(texts):
        return texts

    assert serving._name(served) == "served" and serving._name(lambda t: t) == "<lambda>"
    assert serving._is_url("https://h/v1") and serving._is_url("http://h") and not serving._is_url("h/v1")
    assert not serving._is_url(served)
    assert serving._guess_precision("export/onnx-int8") == "int8" and serving._guess_precision("m-Q8_0.gguf") == "int8"
    assert serving._guess_precision("export/onnx") == "float" and serving._guess_precision("model-f16.gguf") == "float"
    assert serving._name("http://h:1/v1") == "http://h:1/v1" and serving._name("/a/b/m-f16.gguf") == "m-f16.gguf"
    assert serving._batches(list("abcde"), 2) == [["a", "b"], ["c", "d"], ["e"]]
    np.testing.assert_allclose(serving._unit([[3, 4], [0, 0]]), [[0.6, 0.8], [0, 0]])
    assert serving._length_word(np.array([[0.6, 0.8]])) == "unit length"
    assert serving._length_word(np.array([[3.0, 4.0], [0.0, 2.0]])) == "of length 2-5"
