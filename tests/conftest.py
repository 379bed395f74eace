"""Shared pytest set-up: tests marked ``gpu`` are skipped when no CUDA device is available."""

from __future__ import annotations

import pytest


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
