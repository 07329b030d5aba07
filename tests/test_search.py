"""Retrieval primitives: exact dense top-k, BM25 in scripts with and without spaces, and fusion with empty runs."""

import numpy as np
import pytest

from embtune.search import bm25_search, bm25_tokens, dense_search, empty_queries, fuse, top_k


def test_top_k_is_the_exact_best_by_inner_product():
    rng = np.random.default_rng(0)
    docs = rng.standard_normal((500, 16)).astype(np.float32)
    queries = rng.standard_normal((7, 16)).astype(np.float32)
    scores, indices = top_k(queries, docs, 10)
    expected = np.argsort(-(queries @ docs.T), axis=1)[:, :10]  # brute force, no library
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ docs.T, expected, axis=1), rtol=1e-5)
    run = dense_search(queries[:2], docs[:3], ["a", "b"], ["x", "y", "z"], k=100)  # k above the corpus size
    assert all(len(docs_) == 3 for docs_ in run.values())


def test_bm25_ranks_the_lexical_match_first_and_leaves_no_match_empty():
    docs = {"a": "the cat sat on the mat", "b": "dogs chase cats", "c": "stock markets fell sharply today"}
    run = bm25_search({"q": "stock market falls", "none": "the of and", "blank": "   "}, docs, k=3)
    assert max(run["q"], key=run["q"].get) == "c" and "a" not in run["q"]
    assert run["none"] == {} and run["blank"] == {} and empty_queries(run) == 2


def test_bm25_matches_chinese_and_japanese_text_without_spaces():
    assert bm25_tokens("铁塔在巴黎") == ["铁塔", "塔在", "在巴", "巴黎"]
    assert bm25_tokens("东京タワー") == ["东京", "京タ", "タワ", "ワー"]
    assert bm25_tokens("Python 3 的列表 sort") == ["python", "的列", "列表", "sort"]
    docs = {
        "eiffel": "埃菲尔铁塔位于法国巴黎，于一八八九年建成。",
        "wall": "长城是中国古代的军事防御工程。",
        "tokyo": "東京タワーは東京都港区にある電波塔です。",
    }
    run = bm25_search({"zh": "巴黎的铁塔是哪一年建成的", "ja": "東京タワーはどこ"}, docs, k=3, stopwords=None)
    assert max(run["zh"], key=run["zh"].get) == "eiffel"
    assert max(run["ja"], key=run["ja"].get) == "tokyo"


def test_fusion_keeps_queries_one_system_found_nothing_for():
    dense = {"q1": {"a": 0.9, "b": 0.8, "c": 0.1}, "q2": {"c": 0.8}, "q3": {"a": 0.1}}
    lexical = {"q1": {"b": 3.0, "c": 1.0}, "q2": {}, "q3": {}}
    for method in ("rrf", "wsum"):
        fused = fuse([dense, lexical], method)
        assert set(fused) == {"q1", "q2", "q3"}
        assert set(fused["q1"]) == {"a", "b", "c"} and max(fused["q1"], key=fused["q1"].get) == "b"
        assert list(fused["q2"]) == ["c"] and list(fused["q3"]) == ["a"]  # the one system that found something
    assert fuse([{"q": {}}, {"q": {}}]) == {"q": {}}


def test_fusion_on_a_hand_computed_case():
    dense = {"q": {"a": 0.9, "b": 0.5, "c": 0.1}}
    lexical = {"q": {"b": 12.0, "c": 8.0, "d": 2.0}}
    rrf = fuse([dense, lexical])["q"]  # the defaults: RRF with Cormack et al.'s k = 60
    assert rrf == pytest.approx({"a": 1 / 61, "b": 1 / 62 + 1 / 61, "c": 1 / 63 + 1 / 62, "d": 1 / 63})
    wsum = fuse([dense, lexical], "wsum", weights=[0.5, 0.5])["q"]
    # min-max per run: dense a 1, b 0.5, c 0; lexical b 1, c 0.6, d 0
    assert wsum == pytest.approx({"a": 0.5, "b": 0.75, "c": 0.3, "d": 0.0})


def test_fusion_honours_its_constant_and_default_weights_by_hand():
    """RRF at k = 1, where the constant matters (ranx's default is 60): a 1/2, b 1/3 + 1/2; wsum with the default
    equal weights of three runs (1/3 each) against weights that favour the first; a method ranx has but we do
    not promise is refused."""
    dense = {"q": {"a": 0.9, "b": 0.5, "c": 0.1}}
    lexical = {"q": {"b": 12.0, "c": 8.0, "d": 2.0}}
    assert fuse([dense, lexical], "rrf", k=1)["q"] == pytest.approx(
        {"a": 1 / 2, "b": 1 / 3 + 1 / 2, "c": 1 / 4 + 1 / 3, "d": 1 / 4})
    third = {"q": {"d": 1.0, "a": 0.0}}
    # min-max: dense a 1, b .5, c 0; lexical b 1, c .6, d 0; third d 1, a 0
    assert fuse([dense, lexical, third], "wsum")["q"] == pytest.approx(
        {"a": 1 / 3, "b": 0.5, "c": 0.2, "d": 1 / 3})
    assert fuse([dense, lexical], "wsum", weights=[0.8, 0.2])["q"] == pytest.approx(
        {"a": 0.8, "b": 0.6, "c": 0.12, "d": 0.0})
    with pytest.raises(ValueError, match='method must be "rrf" or "wsum", not \'max\''):
        fuse([dense, lexical], "max")


def test_bm25_keeps_a_one_character_word_of_a_script_without_spaces_and_drops_stop_words():
    """A lone CJK character between punctuation is a token of its own (Chinese has many one-character words:
    猫, cat); with English stop words a query of stop words alone matches nothing, without them it does."""
    assert bm25_tokens("猫。") == ["猫"]
    docs = {"cat": "猫，一种小型哺乳动物。", "dog": "狗是人类的朋友。", "en": "the cat of the house"}
    found = bm25_search({"q": "猫"}, docs, k=3, stopwords=None)["q"]
    assert max(found, key=found.get) == "cat"
    assert bm25_search({"q": "the of"}, docs, k=3)["q"] == {}  # English stop words by default
    assert list(bm25_search({"q": "the of"}, docs, k=3, stopwords=None)["q"]) == ["en"]
