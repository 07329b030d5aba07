"""The run directory every notebook shares: where each step's artifacts live, and what they were made from.

    RUN/
      synthetic/        01  queries.jsonl, qrels/train.tsv, generations.jsonl (the journal), stats.json
      hard_negatives/   02  train.jsonl, stats.json
      cache/            corpus-<key>.npy: the corpus embedded once per model, data and template
      checkpoints/      03  resumable Trainer checkpoints
      adapter/          03  LoRA weights
      finetuned/        03  the model as trained, when model/ is its slerp with the base
      model/            03  the fine-tuned embedder, a plain sentence-transformers folder
      train_log.json    03  (and train_loss.png)
      mrl.json          04  (and mrl.png)
      metrics.json      05  (and report.md, metrics.png)
      reranker/         06  checkpoints/, adapter/, model/, train_log.json, metrics.json
      notebooks/        the executed notebooks of `make run-all`
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path


class RunDir:
    """Paths of one run directory's artifacts."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.synthetic = self.root / "synthetic"
        self.hard_negatives = self.root / "hard_negatives" / "train.jsonl"
        self.cache = self.root / "cache"
        self.checkpoints = self.root / "checkpoints"
        self.adapter = self.root / "adapter"
        self.finetuned = self.root / "finetuned"
        self.model = self.root / "model"
        self.train_log = self.root / "train_log.json"
        self.mrl = self.root / "mrl.json"
        self.metrics = self.root / "metrics.json"
        self.report = self.root / "report.md"
        self.reranker = self.root / "reranker"
        self.reranker_model = self.reranker / "model"
        self.notebooks = self.root / "notebooks"

    def __repr__(self):
        return f"RunDir({str(self.root)!r})"


def model_fingerprint(path: str | Path) -> str:
    """Changes when the model does: its resolved location and the name, size and modification time of its weights."""
    path = Path(path)
    h = hashlib.sha256(str(path.resolve() if path.exists() else path).encode())
    weights = sorted(path.rglob("*.safetensors")) + sorted(path.rglob("*.bin")) if path.is_dir() else []
    for w in weights:
        stat = w.stat()
        h.update(f"{w.relative_to(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def corpus_fingerprint(corpus: dict[str, dict[str, str]]) -> str:
    """Changes when any document's id, title or text does."""
    h = hashlib.sha256()
    for doc_id, doc in corpus.items():
        h.update(f"{doc_id}\0{doc['title']}\0{doc['text']}\0".encode())
    return h.hexdigest()[:16]


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint the Trainer finished writing (its trainer_state.json is written last); a
    half-written one, left by a kill during saving, is removed so it cannot be resumed from or rotated."""
    done = None
    for path in sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1])):
        if (path / "trainer_state.json").exists():
            done = path
        else:
            shutil.rmtree(path)
    return str(done) if done else None
