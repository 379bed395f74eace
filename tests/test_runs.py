"""Run directories and atomic writes: a failure leaves nothing that looks complete."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from sdwb import runs
from sdwb.errors import SdwbError


def test_run_dir_name():
    assert runs.run_dir("baseline", "0123456789ab") == Path("runs") / "baseline-01234567"
    assert runs.run_dir("x", "deadbeef", root="/tmp/r") == Path("/tmp/r/x-deadbeef")
    for bad_name in ("../x", "a/b", "", "-x"):
        with pytest.raises(SdwbError):
            runs.run_dir(bad_name, "deadbeef")
    with pytest.raises(SdwbError):
        runs.run_dir("x", "xyz")


def test_atomic_dir_success_moves_into_place(tmp_path):
    final = tmp_path / "out" / "variant"
    with runs.atomic_dir(final) as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith("variant.tmp-")
        assert not final.exists()
        (tmp / "weights.bin").write_bytes(b"123")
    assert (final / "weights.bin").read_bytes() == b"123"
    assert os.listdir(final.parent) == ["variant"]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_dir_leaves_nothing_on_exception(tmp_path, exc):
    final = tmp_path / "variant"
    with pytest.raises(exc):
        with runs.atomic_dir(final) as tmp:
            (tmp / "half-written.bin").write_bytes(b"x" * 100)
            (tmp / "sub").mkdir()
            raise exc()
    assert not final.exists()
    assert os.listdir(tmp_path) == []


def test_atomic_dir_refuses_or_replaces_existing(tmp_path):
    final = tmp_path / "variant"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(SdwbError, match="already exists"):
        with runs.atomic_dir(final):
            pass
    with pytest.raises(ValueError):  # a failed overwrite keeps the old artifact intact
        with runs.atomic_dir(final, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise ValueError
    assert os.listdir(final) == ["old.txt"]
    with runs.atomic_dir(final, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert os.listdir(final) == ["new.txt"]
    assert os.listdir(tmp_path) == ["variant"]


def test_atomic_write_text_and_json(tmp_path):
    path = tmp_path / "a" / "b.json"
    runs.atomic_write_json(path, {"x": [1, 2]})
    assert json.loads(path.read_text()) == {"x": [1, 2]}
    runs.atomic_write_text(path, "second")
    assert path.read_text() == "second"
    assert os.listdir(path.parent) == ["b.json"]


def test_atomic_write_failure_keeps_old_content(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    path.write_text("old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(runs.os, "replace", broken_replace)
    with pytest.raises(OSError):
        runs.atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_write_resolved_config(tmp_path):
    data = {"name": "x", "bench": {"steps": 4, "threads": None}}
    path = runs.write_resolved_config(tmp_path, data)
    assert path == tmp_path / "config.resolved.yaml"
    assert yaml.safe_load(path.read_text()) == data


def test_check_writable_file(tmp_path):
    out = runs.check_writable_file(tmp_path / "new" / "dir" / "img.png", (".png",))
    assert out.parent.is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(SdwbError, match="cannot create directory"):
        runs.check_writable_file(tmp_path / "file" / "img.png")
    with pytest.raises(SdwbError, match=r"\.png"):
        runs.check_writable_file(tmp_path / "img.gif", (".png",))
    with pytest.raises(SdwbError, match="is a directory"):
        runs.check_writable_file(tmp_path / "new", None)
