"""The benchmark's quality images across several processes (``accelerate launch``).

Why: quality over thousands of prompts is the slow part of a benchmark, and it parallelises
perfectly (each image depends only on its prompt, seed and model). Under
``accelerate launch --num_processes N -m sdwb bench ...`` every process loads the variants and
generates its share of each variant's prompt chunks (contiguous, whole ``batch``-sized chunks, so
an image is computed exactly as in a single-process run: same batch, same seed), the images are
gathered to the main process (``accelerate.utils.gather_object``, rank order), and only the main
process times the variants, probes memory, scores quality and writes the results. Latency stays a
single-process measurement on purpose: N processes sharing a machine would time each other.

Without ``accelerate launch`` (``WORLD_SIZE`` unset or 1) every function here is the identity of
a single process and accelerate's distributed state is never created.
"""

from __future__ import annotations

import functools
import os


def world_size() -> int:
    """How many processes ``accelerate launch`` / ``torchrun`` started (1 when neither did)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


@functools.cache
def _state():
    """accelerate's ``PartialState`` (gloo on CPUs, NCCL on GPUs), or None in a single process."""
    if world_size() <= 1:
        return None
    from sdwb.train.common import process_state

    return process_state()


def rank() -> int:
    state = _state()
    return 0 if state is None else state.process_index


def is_main() -> bool:
    return rank() == 0


def device_for(device: str) -> str:
    """A row's device for this process: each process of a multi-GPU launch takes its own GPU."""
    state = _state()
    if state is None or not str(device).startswith("cuda") or ":" in str(device):
        return device
    return f"cuda:{state.local_process_index}"


def share(count: int) -> range:
    """This process's contiguous share of ``count`` items (as ``split_between_processes``: the
    first ``count % N`` processes take one more)."""
    n, r = world_size(), rank()
    base, extra = divmod(count, n)
    start = r * base + min(r, extra)
    return range(start, start + base + (1 if r < extra else 0))


def gather(items: list) -> list:
    """Every process's ``items`` concatenated in rank order (on every process)."""
    if _state() is None:
        return items
    from accelerate.utils import gather_object

    return gather_object(items)


def wait() -> None:
    """All processes reach this point before any goes on (no-op in a single process)."""
    state = _state()
    if state is not None:
        state.wait_for_everyone()
