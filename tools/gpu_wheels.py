"""``make gpu-wheels``: the wheels a lent GPU machine lacks, downloaded into ``.whl/`` for the GPU check.

Why: the GPU machines lent to this project (Python 3.12, torch with CUDA, transformers,
accelerate, ...) reach no package registry and lack some of what ``sdwb`` imports. The working
tree travels to them (64 MiB at most, carried paths included), so the missing pure-Python and
manylinux x86-64 CPython 3.12 wheels go along in ``.whl/`` (git-ignored; the device call carries
it), and ``tools/gpu_check.py`` installs the ones the machine lacks into a scratch directory.

What: the distributions the GPU machine is known to lack (``MISSING``), pinned to this
environment's versions (``.venv``: run it with that Python, as ``make gpu-wheels`` does);
typing-extensions (pydantic 2.14 needs >= 4.16; the check installs it only where the machine's is
older); torchao (not in ``.venv``) pinned to the release built against the GPU machine's torch
2.11, kept only if it fits. The script checks every wheel's ``Requires-Dist`` (Python 3.12, Linux,
no extras) against the wheels plus what the GPU machine has (``GPU_HAS``), that pydantic-core is the
version pydantic pins, prints the sizes, and fails when a dependency is unaccounted for or what
travels (tracked files + untracked files git does not ignore + the wheels) passes ``LIMIT_MIB``.
The sizes are the files' own: ``git ls-files -z | xargs -0 du -cb | tail -1`` undercounts, as
xargs runs du in several batches and ``tail -1`` shows the last batch's total only.
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".whl"
LIMIT_MIB = 60  # the device tool carries 64 MiB in all: keep a margin for untracked files
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")

# what the GPU machine lacks and sdwb imports (the list)
MISSING = ("diffusers", "torch-pruning", "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
           "tomesd")
# pydantic 2.14 / pydantic-core 2.50 require typing-extensions >= 4.16.0; the GPU machine's version is
# not known, so it travels (40 kB) and tools/gpu_check.py installs it only over an older one
ALSO = ("typing-extensions",)
# torchao is not in .venv (an optional extra); 0.18.0 is the release built against torch 2.11, the
# GPU machine's torch (its C++ kernels are ABI-bound to one torch release); dropped when it does not fit
OPTIONAL = {"torchao": "0.18.0"}
# installed on the GPU machine (its image's package list, the part these wheels' requirements and
# sdwb's imports name: requests for diffusers, torchmetrics for the judge's metrics)
GPU_HAS = {
    "torch", "transformers", "accelerate", "huggingface-hub", "onnx", "onnxruntime", "onnxscript", "onnx-ir",
    "safetensors", "numpy", "pandas", "matplotlib", "rich", "typer", "click", "pyyaml", "filelock", "peft",
    "pytest", "tqdm", "psutil", "packaging", "regex", "tokenizers", "pillow", "sympy", "jinja2", "fsspec",
    "networkx", "protobuf", "requests", "certifi", "charset-normalizer", "idna", "urllib3", "torchmetrics",
    "lightning-utilities", "typing-extensions", "triton",
}
# Requires-Dist that nothing imports on Python 3.12
UNUSED = {"importlib-metadata": "diffusers imports it only on Python < 3.8 (utils/import_utils.py)"}
TARGET_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
              "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def norm(name: str) -> str:
    """PEP 503 name: lower case, runs of ``-_.`` as ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    """``{name: version}`` to download: this environment's versions, torchao's pin."""
    out = {}
    for name in (*MISSING, *ALSO):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"error: {name} is not installed in {sys.executable} (run this with .venv's "
                             "Python: make gpu-wheels)") from None
    return {**out, **OPTIONAL}


def download(name: str, version: str) -> None:
    platforms = [x for p in PLATFORMS for x in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(WHEELS),
           f"{name}=={version}"]
    subprocess.run(cmd, check=True)


def wheel_of(name: str, version: str) -> Path:
    found = [w for w in WHEELS.glob("*.whl") if norm(w.name.split("-")[0]) == norm(name)
             and w.name.split("-")[1] == version]
    if len(found) != 1:
        raise SystemExit(f"error: expected one wheel of {name} {version} in {WHEELS}, found {len(found)}")
    return found[0]


def requires(wheel: Path) -> list:
    """The wheel's ``Requires-Dist`` that apply on the GPU machine (Python 3.12, Linux, no extras)."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(name).decode("utf-8"))
    reqs = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(TARGET_ENV)]


def tree_bytes() -> int:
    """Bytes of what travels besides the wheels: the files git tracks and the untracked ones it
    does not ignore (each file's size, summed here rather than by batches of du)."""
    cmd = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    names = subprocess.run(cmd, cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    return sum((ROOT / n).stat().st_size for n in set(names) if n and (ROOT / n).is_file())


def main() -> int:
    WHEELS.mkdir(exist_ok=True)
    wanted = pins()
    for name, version in wanted.items():
        print(f"{name}=={version}", flush=True)
        download(name, version)
    wheels = {name: wheel_of(name, version) for name, version in wanted.items()}
    keep = set(wheels.values())
    for stale in WHEELS.glob("*.whl"):  # earlier versions
        if stale not in keep:
            print(f"removing stale {stale.name}")
            stale.unlink()
    problems = []
    carried = {norm(n): v for n, v in wanted.items()}
    for name, wheel in wheels.items():
        for req in requires(wheel):
            key = norm(req.name)
            if key in UNUSED:
                print(f"  {name}: {req} not carried: {UNUSED[key]}")
            elif key in carried:  # e.g. pydantic's exact pydantic-core pin
                if not req.specifier.contains(carried[key], prereleases=True):
                    problems.append(f"{name} requires {req}, .whl/ has {carried[key]}")
            elif key not in {norm(n) for n in GPU_HAS}:
                problems.append(f"{name} requires {req}, which neither the GPU machine nor .whl/ has")
    sizes = {w.name: w.stat().st_size for w in keep}
    for file, size in sorted(sizes.items(), key=lambda kv: -kv[1]):
        print(f"{size / 2**20:8.2f} MiB  {file}")
    tree, limit = tree_bytes(), LIMIT_MIB * 2**20
    for name in OPTIONAL:
        if tree + sum(sizes.values()) > limit and wheels[name].name in sizes:
            print(f"dropping {wheels[name].name}: it does not fit")
            sizes.pop(wheels[name].name)
            wheels[name].unlink()
    total = sum(sizes.values())
    print(f"wheels: {len(sizes)} files, {total / 2**20:.2f} MiB; tree (tracked + untracked not ignored) "
          f"{tree / 2**20:.2f} MiB; together {(total + tree) / 2**20:.2f} MiB (limit {LIMIT_MIB} MiB)")
    if total + tree > limit:
        problems.append(f"tree + wheels {(total + tree) / 2**20:.2f} MiB > {LIMIT_MIB} MiB: they do not fit "
                        "the device call (64 MiB in all); the tree must shrink")
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    return 1 if problems else 0



if __name__ == "__main__":
    sys.exit(main())
