"""The run directory every notebook shares: where each step's artifacts live, what they were made from, and when
one may be reused.

    RUN/
      judged/           00  grades.tsv (the journal of who judged what), qrels/dev.tsv and test.tsv, queries.jsonl
      synthetic/        01  queries.jsonl, qrels/train.tsv, generations.jsonl (the journal), stats.json
      hard_negatives/   02  train.jsonl, stats.json
      cache/            corpus-<key>.npy: the corpus embedded once per model, data and template
      checkpoints/      03  resumable Trainer checkpoints
      adapter/          03  LoRA weights
      finetuned/        03  the model as trained, when model/ is its slerp with the base
      model/            03  the fine-tuned embedder, a plain sentence-transformers folder
      train_log.json    03  (and train_loss.png); memory_plan.txt, the memory plan's estimate
      mrl.json          04  (and mrl.png)
      metrics.json      05  (and report.md, metrics.png)
      reranker/         06  checkpoints/, adapter/, model/, train_log.json, metrics.json
      manifests/        what each artifact was made from (see below)
      notebooks/        the executed notebooks of `make run-all` (kernels.log: the kernels' own messages)
      .previous/, .lock `make run-all`: the last finished run's outputs while this run rebuilds them; the run's lock

A run directory never lies: each step writes a manifest (`manifests/<artifact>.json`: the fingerprints of the
data and models it read, and the parameters that shape its output) and reuses an artifact (a checkpoint to
resume, a journal to continue, mined negatives, a trained model) only when its manifest matches what the step
would make now. Otherwise, by `reuse`: "matching" (default) rebuilds it, "never" always rebuilds, "error" stops
with one line naming what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

REUSE = ("matching", "never", "error")


class StaleArtifact(RuntimeError):
    """An artifact in the run directory was made from other inputs, and `reuse="error"` forbids rebuilding it."""


class OverlappingPaths(ValueError):
    """The run directory is, holds or lies inside one of the step's inputs."""


class RunDir:
    """Paths of one run directory's artifacts, and their manifests."""

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
        self.manifests = self.root / "manifests"
        self.judged = self.root / "judged"
        self.memory_plan = self.root / "memory_plan.txt"

    def __repr__(self):
        return f"RunDir({str(self.root)!r})"

    def manifest(self, artifact: str) -> dict | None:
        path = self.manifests / f"{artifact}.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None

    def record(self, artifact: str, manifest: dict) -> None:
        from .files import write_json

        write_json(self.manifests / f"{artifact}.json", manifest)

    def forget(self, artifact: str) -> None:
        (self.manifests / f"{artifact}.json").unlink(missing_ok=True)

    def reusable(self, artifact: str, manifest: dict, reuse: str, paths: list[Path]) -> bool:
        """Whether the artifact at `paths` was made from `manifest`'s inputs and parameters. If it exists and was
        not (or `reuse="never"`), it is deleted to be rebuilt, or, with `reuse="error"`, the step stops."""
        if reuse not in REUSE:
            raise ValueError(f"reuse must be one of {', '.join(REUSE)}, not {reuse!r}")
        present = [p for p in paths if p.exists()]
        if not present:
            return False
        changed = differences(self.manifest(artifact), manifest)
        if not changed and reuse != "never":
            return True
        if reuse == "error":
            raise StaleArtifact(f"{present[0]} was made from other inputs (changed: {', '.join(changed)}); delete "
                                f"it, or set reuse='matching' to rebuild it")  # fmt: skip
        for path in present:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        self.forget(artifact)
        print(f"{present[0]}: made from other inputs (changed: {', '.join(changed) or 'reuse=never'}); rebuilding",
              flush=True)  # fmt: skip
        return False

    def current(self, artifact: str, **inputs: str) -> bool:
        """Whether an artifact another step made was made from these inputs (e.g. the same data and base model)."""
        made = self.manifest(artifact)
        return made is not None and all(made["inputs"].get(k) == v for k, v in inputs.items())


def make_manifest(inputs: dict[str, str], params: dict) -> dict:
    """What an artifact is made from: input fingerprints and the parameters that shape it."""
    return {"inputs": inputs, "params": json.loads(json.dumps(params, default=str))}


def differences(old: dict | None, new: dict) -> list[str]:
    """The inputs and parameters that differ between two manifests (all of them when there is no old one)."""
    if old is None:
        return ["no record of how it was made"]
    return [key for part in ("inputs", "params") for key in sorted(set(old[part]) | set(new[part]))
            if old[part].get(key) != new[part].get(key)]  # fmt: skip


def fingerprint(manifest: dict | None) -> str | None:
    """A short id of a manifest, for the manifests of the artifacts made from it."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16] if manifest else None


def model_fingerprint(path: str | Path) -> str:
    """Changes when the model does: its resolved location and the name, size and modification time of its weights."""
    path = Path(path)
    h = hashlib.sha256(str(path.resolve() if path.exists() else path).encode())
    weights = sorted(path.rglob("*.safetensors")) + sorted(path.rglob("*.bin")) if path.is_dir() else []
    for w in weights:
        stat = w.stat()
        h.update(f"{w.relative_to(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _files_fingerprint(root: Path, paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in sorted(paths):
        if path.is_file():
            h.update(str(path.relative_to(root)).encode())
            with open(path, "rb") as f:
                for block in iter(lambda f=f: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def data_fingerprint(data_dir: str | Path) -> str:
    """Changes when any file of the data folder does (contents hashed: ids reused across data sets do not fool it)."""
    root = Path(data_dir)
    return _files_fingerprint(root, [*root.glob("corpus.jsonl*"), root / "queries.jsonl", *root.glob("qrels/*.tsv")])


def judged_dev_fingerprint(run_dir: str | Path) -> str | None:
    """Changes when notebook 00's judged dev queries do (what the dev choices of notebooks 03 and 06 read); None
    without them. Judged test queries are left out: judging more of them later changes no trained model."""
    judged = RunDir(run_dir).judged
    dev = judged / "qrels" / "dev.tsv"
    return _files_fingerprint(judged, [dev, judged / "queries.jsonl"]) if dev.exists() else None


def corpus_fingerprint(corpus: dict[str, dict[str, str]]) -> str:
    """Changes when any document's id, title or text does."""
    h = hashlib.sha256()
    for doc_id, doc in corpus.items():
        h.update(f"{doc_id}\0{doc['title']}\0{doc['text']}\0".encode())
    return h.hexdigest()[:16]


def check_outputs(run_dir: str | Path, **inputs: str | Path | None) -> None:
    """Refuse a run directory that is, holds or lies inside one of the inputs (model folders, data): the run would
    write into what it reads (e.g. `--model RUN/model --run RUN` overwrote its own base model)."""
    run = Path(run_dir).resolve()
    for name, path in inputs.items():
        if not path or not Path(path).exists():
            continue
        source = Path(path).resolve()
        relation = "is" if run == source else "holds" if run in source.parents else "lies inside"
        if run == source or run in source.parents or source in run.parents:
            raise OverlappingPaths(f"run_dir {run} {relation} {name} {source}: the run would write into what it "
                                   "reads; pick a run directory outside it")  # fmt: skip


def check_writable(run_dir: str | Path) -> None:
    """The run directory can be created and written, or one line says why."""
    run = Path(run_dir)
    existing = next(p for p in (run, *run.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"run_dir {run}: {existing} is not writable; pick a run directory you can write to")


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
