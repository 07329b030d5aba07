import os
import stat

import pytest

from embtune.files import atomic_path, replace_dir, write_json


def test_a_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"ok": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == '{\n  "ok": 1\n}\n'
    assert os.listdir(tmp_path) == ["metrics.json"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()


def test_replace_dir_swaps_whole_folders(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "old.txt").write_text("old")
    with pytest.raises(ValueError):
        with replace_dir(tmp_path / "model") as tmp:
            (tmp / "new.txt").write_text("new")
            raise ValueError
    assert os.listdir(tmp_path / "model") == ["old.txt"] and os.listdir(tmp_path) == ["model"]
    with replace_dir(tmp_path / "model") as tmp:
        (tmp / "new.txt").write_text("new")
    assert os.listdir(tmp_path / "model") == ["new.txt"]
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o777 & ~_umask()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
