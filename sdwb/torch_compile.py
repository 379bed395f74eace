"""``torch.compile`` for the torch backend: the UNet compiled by inductor, refused early when it cannot be.

What: :func:`compile_unet` replaces ``pipe.unet`` with ``torch.compile(pipe.unet, mode=...,
dynamic=False)``; :func:`check_compile` says in one line why inductor cannot work here (no C++
compiler or no Python headers on the CPU, no Triton on CUDA) before anything is loaded. Both
``sdwb generate --compile`` and the bench harness (``compile: true`` in a scenario) call them,
so a compiled row in a benchmark is exactly what the CLI runs.

Why the UNet only: it is where the time goes (``steps`` calls per image, two samples each with
guidance); the text encoder runs once per prompt and the VAE decoder once per image, so
compiling them would add compile time for little. They stay eager.

Why the ``OptimizedModule`` wrapper (``pipe.unet = torch.compile(pipe.unet)``) and not an
in-place ``unet.compile()``: the benchmark times every UNet call by wrapping ``unet.forward``
(:class:`bench.latency.ComponentTimer`); on the wrapper that is the compiled call, timed from
outside the graph, whereas an in-place compile would trace the timer into the graph.

Why ``dynamic=False``: a bench row has one batch and one image size, so one static graph per
shape is the fastest kernel; a new shape compiles again at its first call. Compilation is lazy:
:func:`compile_unet` returns at once and the first call at a shape pays the compile (the bench
harness does that call untimed and reports it as ``compile_s``). Inductor's CPU kernels fix
their OpenMP thread count when they are compiled, so compile under the thread count you run with.
"""

from __future__ import annotations

import os
import sysconfig
from typing import Literal, get_args

from sdwb.errors import SdwbError

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)
RECOMPILE_LIMIT = 64  # shapes per process before dynamo silently falls back to eager (its default: 8)


def check_mode(mode: str) -> str:
    """``mode`` when it is one of :data:`COMPILE_MODES`; a one-line SdwbError otherwise."""
    if mode not in COMPILE_MODES:
        raise SdwbError(f"compile mode {mode!r}: expected one of {', '.join(COMPILE_MODES)}")
    return mode


def check_compile(device: str = "cpu") -> None:
    """Raise a one-line SdwbError naming why inductor cannot compile for ``device`` here."""
    if str(device).startswith("cuda"):
        from torch.utils._triton import has_triton

        if not has_triton():
            raise SdwbError("torch.compile on CUDA needs Triton, which is not installed here "
                            "(pip install triton, or leave out compile)")
        return
    _check_cpp_compiler()
    include = sysconfig.get_paths().get("include") or ""
    if not os.path.isfile(os.path.join(include, "Python.h")):
        raise SdwbError(f"torch.compile on the CPU builds C++ kernels against the Python headers, and "
                        f"Python.h is not in {include or 'this Python'} (install python3-dev, or leave "
                        "out compile)")


def _check_cpp_compiler() -> None:
    """Inductor's own compiler search (``CXX`` / ``torch._inductor.config.cpp.cxx``, then g++)."""
    from torch._inductor import config
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception:  # InvalidCxxCompiler, or a compiler that does not run
        looked = ", ".join(c for c in (os.environ.get("CXX"), *_as_tuple(config.cpp.cxx)) if c)
        raise SdwbError(f"torch.compile on the CPU needs a C++ compiler and none runs here (looked for "
                        f"{looked or 'g++'}; install g++ or set CXX, or leave out compile)") from None


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def compile_unet(pipe, mode: str = "default"):
    """Wrap ``pipe.unet`` in ``torch.compile`` (inductor, static shapes); returns ``pipe``.

    Idempotent: an already compiled UNet is left as it is. Nothing is compiled until the first
    call (see the module doc).
    """
    import torch
    import torch._dynamo

    check_mode(mode)
    from sdwb.cache.config import check_compilable

    check_compilable(pipe)  # DeepCache's step schedule is Python state
    if isinstance(pipe.unet, torch._dynamo.eval_frame.OptimizedModule):
        return pipe
    # every shape (and every compiled UNet) is one more entry on the same code objects: past the
    # default limit of 8 dynamo would run eager without a word, so a sweep raises it
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    pipe.unet = torch.compile(pipe.unet, mode=mode, dynamic=False)
    return pipe


def eager_unet(pipe):
    """The UNet module itself, compiled or not (for code that walks or copies its submodules)."""
    return getattr(pipe.unet, "_orig_mod", pipe.unet)
