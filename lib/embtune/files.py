"""Write outputs whole or not at all: to a temporary name first, renamed into place when complete."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary file path beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system has no such call."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    if ctypes.get_errno() in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the file system cannot swap
        return False
    raise OSError(ctypes.get_errno(), f"cannot swap {a} and {b}")


@contextmanager
def replace_dir(path: str | Path):
    """Yield a temporary folder beside `path`; it replaces `path` (and what was there) if the block succeeds.
    The old and the new folder are swapped in one step, so `path` is at every moment either complete old or
    complete new, whenever the process is killed; leftovers of killed runs (hidden `.name.*` folders) go."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in path.parent.glob(f".{path.name}.*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary folder
        if not (path.exists() and _exchange(tmp, path)):
            if path.exists():  # no atomic swap here: move the old one aside first, then the new one in
                os.replace(path, Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)) / "old")
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def bundled(in_clone: str, in_package: str) -> Path:
    """A folder or file shipped with the suite: `in_clone`, relative to a clone of the repository (an editable
    install), else `in_package` inside the installed package (pyproject.toml maps it there in the wheel)."""
    here = Path(__file__).resolve().parent
    clone = here.parents[1] / in_clone
    return clone if here.parent.name == "lib" and clone.exists() else here / in_package
