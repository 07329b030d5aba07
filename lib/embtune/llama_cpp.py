"""llama.cpp for the GGUF export and its check: the converter and `llama-server`, from one source.

Both come from the llama.cpp that llama-cpp-python vendors in its source distribution on PyPI (pip is the only
client needed, and converter and server can never be of two versions). The server is built once with cmake and
a C++ compiler into `~/.cache/embtune/llama.cpp-<version>/` (about 10 minutes on two cores), outside any run:

    python -m embtune.llama_cpp build      # prints the binary's path; `make llama-server` runs it

`server_command` is the one command line SERVING.md prints and the check starts, so what is checked is what
is deployed. `serve` runs it on a free loopback port for the duration of a `with` block.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python, whose sdist vendors llama.cpp (vendor/llama.cpp)
# Left out of the extracted source: test vocabularies and documentation, 110 of its 176 MB.
SKIP = ("models/", "docs/", "media/", "benches/")
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON",
               # no downloads while building (the web UI is fetched by default) and no TLS: it serves loopback
               "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_OPENSSL=OFF"]  # fmt: skip
# Qwen2/Qwen3's pre-tokenizer split, as tokenizer.json writes it; llama.cpp implements it as "qwen2".
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


def stage_tokenizer(tokenizer_json: Path) -> str:
    """Ready a staged copy of a tokenizer.json for llama.cpp's converter; returns the pre-tokenizer to name
    for it, or "" (let the converter decide by its hash of the vocabulary's ids, which a retrained vocabulary,
    like the tiny fixtures', does not match).

    - "qwen2" where the tokenizer splits text exactly as Qwen's does (its pattern, then bytes), "gpt-2" where it
      is GPT-2's byte-level split alone: what llama.cpp implements under those names.
    - A byte-level BPE flagged `byte_fallback` (transformers writes one for a tokenizer it reads from a GGUF file)
      loses the flag: the converter takes such a BPE for a Llama-2 SentencePiece vocabulary and writes one that
      llama-server cannot load (HTTP 500 "unordered_map::at"; its log: "newline token not found"). Byte-level
      means every byte has a symbol, so the fallback never fires and no text tokenizes differently without it.
    """
    data = json.loads(tokenizer_json.read_text())
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    byte_level = any(s.get("type") == "ByteLevel" for s in steps)
    if byte_level and data.get("model", {}).get("byte_fallback"):
        data["model"]["byte_fallback"] = False
        tokenizer_json.write_text(json.dumps(data, ensure_ascii=False))
    splits = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
    if splits == [QWEN2_SPLIT]:
        return "qwen2"
    gpt2 = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    return "gpt-2" if len(steps) == 1 and gpt2.items() <= steps[0].items() else ""


class NoLlamaCpp(RuntimeError):
    """llama.cpp's converter or server is not at hand; the message says why and what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("EMBTUNE_CACHE", Path.home() / ".cache" / "embtune")) / f"llama.cpp-{VERSION}"


@contextmanager
def _locked(folder: Path):
    """One fetch or build at a time (test workers, two notebooks) per cache folder."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def fetch_source(dest: Path | None = None) -> Path:
    """llama.cpp's source from llama-cpp-python's sdist on PyPI, extracted once into `dest` (the cache)."""
    dest = dest or cache_dir() / "src"
    if (dest / "CMakeLists.txt").exists() and (dest / "convert_hf_to_gguf.py").exists():
        return dest
    with _locked(dest):
        if (dest / "CMakeLists.txt").exists():
            return dest
        with tempfile.TemporaryDirectory() as tmp:
            pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp]
            done = subprocess.run([*pip, f"llama-cpp-python=={VERSION}"], capture_output=True, text=True)
            if done.returncode:
                raise NoLlamaCpp(f"could not fetch llama-cpp-python=={VERSION}'s source from PyPI: "
                                 f"{done.stderr.strip()[-300:]}")  # fmt: skip
            (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
            partial = dest.with_name(dest.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            with tarfile.open(sdist) as tar:
                for member in tar.getmembers():
                    top, _, path = member.name.partition("/")  # llama_cpp_python-<version>/vendor/llama.cpp/…
                    found, rel = path.startswith("vendor/llama.cpp/"), path.removeprefix("vendor/llama.cpp/")
                    if found and rel and not rel.startswith(SKIP) and (member.isfile() or member.isdir()):
                        member.name = rel
                        tar.extract(member, partial, filter="data")
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(partial, dest)
    return dest


def converter(source: str | None) -> Path:
    """convert_hf_to_gguf.py from `source`: a llama.cpp folder, or "pypi" (the cached source, fetched once)."""
    if not source:
        raise NoLlamaCpp("no llama.cpp converter: set `llama_cpp` to a llama.cpp folder, or to \"pypi\" to fetch the "
                         "one vendored in llama-cpp-python's source distribution")  # fmt: skip
    folder = fetch_source() if source == "pypi" else Path(source).expanduser()
    if not (folder / "convert_hf_to_gguf.py").exists():
        raise NoLlamaCpp(f"{folder} holds no convert_hf_to_gguf.py (a llama.cpp checkout has it at its root)")
    return folder / "convert_hf_to_gguf.py"


def build_server(source: Path | None = None, out: Path | None = None) -> Path:
    """`llama-server` built with cmake from the cached source (once: later calls return the binary)."""
    out = out or cache_dir() / "bin" / "llama-server"
    if out.exists():
        return out
    if not shutil.which("cmake") or not (shutil.which("c++") or shutil.which("g++")):
        raise NoLlamaCpp("cmake and a C++ compiler are needed to build llama-server (apt-get install cmake g++), "
                         "or set `llama_server` to a llama-server binary")  # fmt: skip
    source = source or fetch_source()
    with _locked(out.parent):
        if out.exists():
            return out
        with tempfile.TemporaryDirectory() as build:
            generator = ["-G", "Ninja"] if shutil.which("ninja") else []
            for step in (["cmake", "-S", str(source), "-B", build, *generator, *CMAKE_FLAGS],
                         ["cmake", "--build", build, "--target", "llama-server", "-j", str(os.cpu_count() or 2)]):
                done = subprocess.run(step, capture_output=True, text=True)
                if done.returncode:
                    raise NoLlamaCpp(f"building llama-server failed ({' '.join(step[:2])}): "
                                     f"{(done.stderr or done.stdout).strip()[-400:]}")  # fmt: skip
            out.parent.mkdir(parents=True, exist_ok=True)
            partial = out.with_name(out.name + ".partial")
            shutil.copy2(Path(build) / "bin" / "llama-server", partial)
            os.replace(partial, out)
    return out


def find_server(setting: str | None) -> Path:
    """The llama-server binary for `setting`: "build" (build or reuse the cached one), a path, or None (none)."""
    if setting is None:
        raise NoLlamaCpp("llama_server is None: the GGUF file is not served here; check it with serve_url (SERVING.md)")
    if setting == "build":
        return build_server()
    path = Path(setting).expanduser()
    if not path.is_file():
        raise NoLlamaCpp(f"{path}: no llama-server binary there (`make llama-server` builds one)")
    return path


def embedding_context(max_seq_length: int) -> int:
    """llama-server's context for an embedder: room for the model's max_seq_length tokens (it refuses a request
    of as many tokens as its context holds). llama.cpp rounds the context up to a multiple of 256 and embeds
    anything that fits whole, so it cannot refuse texts just past the model's length: clients clip (SERVING.md)."""
    return max_seq_length + 1


def server_command(gguf: str | Path, *, length: int, pooling: str | None = None, rerank: bool = False,
                   port: int = 8080, binary: str = "llama-server") -> list[str]:  # fmt: skip
    """The command SERVING.md prints and the check runs. One slot (`-np 1`), so the whole context (`-c`) is one
    text's: several slots share it and long texts would overflow. `-ub`/`-b` = the length: llama.cpp embeds a
    text in one physical batch."""
    kind = ["--reranking"] if rerank else ["--embedding", "--pooling", pooling or "last"]
    return [binary, "-m", str(gguf), *kind, "-c", str(length), "-b", str(length), "-ub", str(length), "-np", "1",
            "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(command: list[str], port: int, timeout: float = 120):
    """Runs `command` (a `server_command` on `port`) until the block ends; yields its base URL once /health
    answers. A server that exits or never answers raises NoLlamaCpp with the end of its log."""
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                        if reply.status == 200:
                            break
                except OSError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    tail = " | ".join(log.read().strip().splitlines()[-3:])
                    raise NoLlamaCpp(f"llama-server did not start ({' '.join(command[:3])} …): {tail}")
                time.sleep(0.2)
            yield f"http://127.0.0.1:{port}"
        finally:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()


def serve(binary: Path, gguf: str | Path, **options):
    """`running(server_command(...))` on a free port: `with serve(binary, gguf, length=...) as url: ...`."""
    port = _free_port()
    return running(server_command(gguf, port=port, binary=str(binary), **options), port)


if __name__ == "__main__":
    if sys.argv[1:] != ["build"]:
        sys.exit("usage: python -m embtune.llama_cpp build")
    try:
        print(build_server())
    except NoLlamaCpp as e:
        sys.exit(f"error: {e}")
