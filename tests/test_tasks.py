import pytest

from conftest import SAMPLES, SHARED
from embtune import tasks


def test_classification_and_clustering_on_labelled_sample(minilm):
    texts, labels = tasks.load_labelled(SAMPLES / "pydocs_labels" / "texts.jsonl")
    n_labels = len(set(labels))
    emb = tasks.embed(minilm, texts)
    probe = tasks.classification(emb, labels)
    assert set(probe) == {"accuracy", "precision", "recall", "f1"}
    assert probe["accuracy"] > 2 / n_labels  # real embeddings separate the modules well above chance
    clusters = tasks.clustering(emb, labels)
    assert set(clusters) == {"silhouette", "adjusted_rand", "nmi"}
    assert clusters["nmi"] > 0.2 and -1 <= clusters["silhouette"] <= 1


def test_sts_spearman_on_the_bundled_sample(minilm):
    first, second, gold = tasks.load_sts(SAMPLES / "sts_general" / "en.tsv")
    assert len(first) == 300 and 0 <= gold.min() and gold.max() <= 5
    assert tasks.sts(minilm, first, second, gold)["spearman"] > 70  # all-MiniLM-L6-v2 scores about 82 on STS-B


def test_general_skill_warns_when_the_shipped_model_lost_more_than_the_threshold(minilm, tiny_embedding):
    """A random model in place of the fine-tuned one has lost the base's general skill: the warning says so;
    the base against itself loses nothing, and no threshold means no warning."""
    from embtune.evaluate import general_skill
    from embtune.models import load_embedder

    random_model = load_embedder(str(tiny_embedding), device="cpu")
    lost = general_skill({"base": minilm, "finetuned": random_model}, "auto", max_drop=5.0)
    assert lost["base"] > 70 > lost["finetuned"] and "lost" in lost["warning"]
    assert "warning" not in general_skill({"base": minilm, "finetuned": minilm}, "auto", max_drop=5.0)
    assert "warning" not in general_skill({"base": minilm, "finetuned": random_model}, "auto")


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data is not here (a clone outside this workspace)")
def test_sts_spearman_english_and_chinese_official_files(minilm):
    first, second, gold = tasks.load_sts(SHARED / "stsbenchmark" / "sts-test.csv")
    assert len(first) == 1379 and gold.max() <= 5
    english = tasks.sts(minilm, first[:300], second[:300], gold[:300])["spearman"]
    assert english > 70  # all-MiniLM-L6-v2 scores about 82 on STS-B test
    zh_first, zh_second, zh_gold = tasks.load_sts(SHARED / "chinese-stsb" / "sts-b-test.txt")
    assert len(zh_first) == 1361 and zh_first[0] == "一个女孩在给她的头发做发型。"
    chinese = tasks.sts(minilm, zh_first[:300], zh_second[:300], zh_gold[:300])["spearman"]
    assert chinese < english  # an English-only model is weaker on Chinese
