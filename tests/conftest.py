"""Shared pytest set-up: tests marked ``gpu`` are skipped when no CUDA device is available;
``cli_env`` (every test) keeps what an in-process ``cli.main`` sets from leaking into other tests."""

from __future__ import annotations

import os
import sys

import pytest

# what sdwb.app.cli.main sets with os.environ.setdefault (offline, quiet libraries)
CLI_ENV_DEFAULTS = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error",
                    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


def pytest_collection_modifyitems(config, items):
    if not any("gpu" in item.keywords for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A diffusers-layout directory holding ``sdwb.testing.build_tiny_pipeline(seed=0)``."""
    from sdwb.testing import build_tiny_pipeline

    path = tmp_path_factory.mktemp("tiny-pipeline")
    build_tiny_pipeline(seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_onnx_dir(tiny_pipeline_dir, tmp_path_factory):
    """``sdwb export onnx`` of :func:`tiny_pipeline_dir` (all components), made once per session:
    read-only for the tests that take it (a test that modifies an export copies it first)."""
    from export.onnx import export_onnx

    out = tmp_path_factory.mktemp("tiny-onnx") / "export"
    export_onnx(str(tiny_pipeline_dir), out)
    return out


@pytest.fixture(autouse=True)
def cli_env(monkeypatch):
    """``cli.main`` sets library environment defaults and the default thread count
    (``OMP_NUM_THREADS``, torch's threads when torch is loaded); all of it is undone after the test."""
    for key, value in CLI_ENV_DEFAULTS.items():
        monkeypatch.setenv(key, os.environ.get(key, value))
    if "OMP_NUM_THREADS" in os.environ:
        monkeypatch.setenv("OMP_NUM_THREADS", os.environ["OMP_NUM_THREADS"])
    else:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    yield
    if before is not None:
        torch.set_num_threads(before)


@pytest.fixture
def fixed_threads(monkeypatch):
    """A fixed thread count for a test that compares two training runs bit for bit: an automatic
    count follows the machine's load between training steps (``sdwb.threads.adapt``), and a float sum
    over 1 or 2 threads rounds differently, so such runs differ whenever a neighbour comes or goes
    (CI saw ``threads: 2 -> 1`` in the middle of the distillation resume test)."""
    import torch

    from sdwb import threads

    count = torch.get_num_threads()
    fixed = threads.ThreadChoice(count, threads.THREADS_ENV, count, None, None, "fixed for a bit-identity")
    monkeypatch.setattr(threads, "_CHOICE", fixed)
    return count
