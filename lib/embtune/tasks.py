"""The guide's other embedding task families: classification, clustering and STS (scikit-learn, scipy)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    accuracy_score,
    adjusted_rand_score,
    normalized_mutual_info_score,
    precision_recall_fscore_support,
    silhouette_score,
)
from sklearn.model_selection import train_test_split

from .data import DataError
from .encode import encode


def general_sts_file() -> Path:
    """The bundled general-skill STS sample (data_samples/sts_general/en.tsv: 300 STS Benchmark test pairs)."""
    from .files import bundled

    return bundled("data_samples/sts_general", "general") / "en.tsv"


def load_labelled(path: str | Path) -> tuple[list[str], list[str]]:
    """`texts.jsonl` rows of {"text", "label"} (classification and clustering)."""
    texts, labels = [], []
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                texts.append(str(row["text"]))
                labels.append(str(row["label"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(
                    path,
                    number,
                    "not a JSON object with text and label",
                    'write one {"text": ..., "label": ...} object per line',
                ) from None
    return texts, labels


def load_sts(path: str | Path) -> tuple[list[str], list[str], np.ndarray]:
    """STS pairs: `sentence1<TAB>sentence2<TAB>score` (Chinese STS-B, and data_samples/sts_general with its
    header line), or the STS Benchmark csv (score in column 5, sentences in 6 and 7)."""
    first, second, scores = [], [], []
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if row[:3] == ["sentence1", "sentence2", "score"]:
                continue
            a, b, s = (row[5], row[6], row[4]) if len(row) >= 7 else (row[0], row[1], row[2])
            first.append(a)
            second.append(b)
            scores.append(float(s))
    return first, second, np.asarray(scores)


def embed(model, texts: list[str], instruction: str | None = None):
    """Embeddings for the classification and clustering scores: with `instruction` as a query (Qwen3's way of
    telling the model the task), else as documents."""
    return encode(model, texts, "query" if instruction else "document", instruction, progress=False)


def classification(emb, labels: list[str], test_size: float = 0.3, seed: int = 0) -> dict[str, float]:
    """A logistic-regression probe on frozen embeddings; macro-averaged precision, recall and F1."""
    x_train, x_test, y_train, y_test = train_test_split(
        emb, labels, test_size=test_size, random_state=seed, stratify=labels
    )
    predicted = LogisticRegression(max_iter=1000).fit(x_train, y_train).predict(x_test)
    precision, recall, f1, _ = precision_recall_fscore_support(y_test, predicted, average="macro", zero_division=0)
    return {"accuracy": accuracy_score(y_test, predicted), "precision": precision, "recall": recall, "f1": f1}


def clustering(emb, labels: list[str], seed: int = 0) -> dict[str, float]:
    """k-means with k = the number of labels; agreement with the labels (ARI, NMI) and silhouette."""
    predicted = KMeans(n_clusters=len(set(labels)), n_init=10, random_state=seed).fit_predict(emb)
    return {
        "silhouette": float(silhouette_score(emb, predicted, metric="cosine")),
        "adjusted_rand": float(adjusted_rand_score(labels, predicted)),
        "nmi": float(normalized_mutual_info_score(labels, predicted)),
    }


def sts(model, first: list[str], second: list[str], gold: np.ndarray) -> dict[str, float]:
    """Spearman correlation between cosine similarity and the gold similarity score (x100, as MTEB)."""
    a = encode(model, first, progress=False)
    b = encode(model, second, progress=False)
    return {"spearman": float(spearmanr((a * b).sum(axis=1), gold).statistic * 100)}
