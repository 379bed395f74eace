"""The YAML side of every config file: safe loading, ``--set`` overrides and shared literals.

Why its own module: the recipe schema (:mod:`sdwb.app.recipe_schema`) embeds the per-technique configs
(``compress.*_config``, ``bench.scenario``), and those need the same YAML reader, the same
``KEY=VALUE`` overrides and the same scheduler / backend / dtype names. Keeping these here, with
no imports from the schemas, lets every schema import them without an import cycle.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml

from sdwb.errors import SdwbError

Scheduler = Literal["ddim", "euler", "dpmpp", "lcm"]
DType = Literal["fp32", "bf16", "fp16"]


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of silently keeping the last one."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: Path) -> dict:
    """A YAML mapping from ``path``; duplicate keys, bad syntax or a non-mapping are one-line errors."""
    if not path.exists():
        raise SdwbError(f"{path}: recipe file not found")
    if path.is_dir():
        raise SdwbError(f"{path}: is a directory, expected a YAML recipe file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SdwbError(f"{path}: cannot read recipe: {e}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = e.problem or e.context or "syntax error"
        raise SdwbError(f"{where}: malformed YAML: {what}") from None
    except yaml.YAMLError as e:
        raise SdwbError(f"{path}: malformed YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SdwbError(f"{path}: expected a mapping of recipe keys at the top level, got {_kind(data)}")
    return data


_KEY_SEGMENT = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*|\d+)$")


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into the key path and the value parsed as a YAML scalar."""
    key, sep, raw = item.partition("=")
    segments = key.strip().split(".")
    if not sep or not key.strip() or not all(_KEY_SEGMENT.match(s) for s in segments):
        raise SdwbError(f"--set {item!r}: expected KEY=VALUE with a dotted key such as bench.steps=4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise SdwbError(f"--set {item!r}: value is not a YAML scalar: {' '.join(str(e).split())}") from None
    return segments, value


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Return a copy of ``data`` with every ``a.b.c=value`` override applied (later ones win)."""
    out = json.loads(json.dumps(data))  # deep copy of plain YAML data
    for item in overrides or []:
        segments, value = parse_override(item)
        node: Any = out
        for depth, seg in enumerate(segments):
            last = depth == len(segments) - 1
            where = ".".join(segments[: depth + 1])
            if isinstance(node, list):
                if not seg.isdigit() or int(seg) >= len(node):
                    raise SdwbError(f"--set {item!r}: {where}: no such list item (list has {len(node)})")
                if last:
                    node[int(seg)] = value
                else:
                    node = node[int(seg)]
            elif isinstance(node, dict):
                if last:
                    node[seg] = value
                elif seg not in node and segments[depth + 1].isdigit():
                    raise SdwbError(f"--set {item!r}: {where} is not a list here, cannot index it")
                else:
                    node = node.setdefault(seg, {})
            else:
                parent = ".".join(segments[:depth])
                raise SdwbError(f"--set {item!r}: {parent} is a {_kind(node)}, not a section")
    return out


def _kind(value: Any) -> str:
    return {dict: "mapping", list: "list", str: "string", bool: "boolean", int: "integer",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def read_with_flags(path: str | Path | None, overrides: list[str] | None, flags: dict[str, Any],
                    guard: dict[str, str] | None = None) -> tuple[dict, str]:
    """``(data, source)`` of a typed config's loader: the YAML file (or nothing), ``--set``
    overrides, then command-line ``flags`` (None values ignored; ``section.key`` sets a key of a
    section). ``guard`` names flags that may not contradict the file (``{"method": "--method"}``)."""
    guard = guard or {}
    data = read_yaml(Path(path)) if path is not None else {}
    source = str(path) if path is not None else "command line"
    data = apply_overrides(data, overrides)
    for key, value in flags.items():
        if value is None:
            continue
        if key in guard and data.get(key) not in (None, value):
            raise SdwbError(f"{guard[key]} {value}: {source} says {key} {data[key]!r}; give one of them")
        section, _, leaf = key.partition(".")
        if leaf:
            node = data.setdefault(section, {})
            if not isinstance(node, dict):
                raise SdwbError(f"{source}: {section}: expected a mapping")
            node[leaf] = value
        else:
            data[key] = value
    return data, source


# --------------------------------------------------------------------------- include: FILE

INCLUDE_PATH_ENV = "SDWB_INCLUDE_PATH"  # more directories ``include:`` may read (os.pathsep-separated)
INCLUDE_SUFFIXES = (".yaml", ".yml")


def include_roots(recipe_file: Path) -> list[Path]:
    """The directories an ``include:`` of ``recipe_file`` may read from: the recipe's own directory,
    the repository's ``configs/``, ``./configs`` of the working directory, and the directories
    listed in ``$SDWB_INCLUDE_PATH`` (all resolved, symlinks followed)."""
    import os

    roots = [Path(recipe_file).resolve().parent, Path(__file__).resolve().parents[1] / "configs",
             Path.cwd() / "configs"]
    roots += [Path(p).expanduser() for p in os.environ.get(INCLUDE_PATH_ENV, "").split(os.pathsep) if p]
    out: list[Path] = []
    for root in roots:
        root = root.resolve()
        if root not in out:
            out.append(root)
    return out


def resolve_include(name: str, recipe_file: Path, where: str) -> Path:
    """The YAML file an ``include: name`` of ``recipe_file`` reads, or a one-line error.

    Why the confinement: ``include:`` once read any file the user could read and printed its lines
    as "unknown key" errors (``include: /etc/shadow``). Now the file must be a ``.yaml``/``.yml``
    whose real path (symlinks followed) lies under :func:`include_roots`; anything else is refused
    without being opened, and no error quotes a refused file's content. ``name`` is tried relative
    to the working directory, the recipe's directory and the repository.
    """
    roots = include_roots(recipe_file)
    candidates = [Path(name).expanduser(), Path(recipe_file).parent / name,
                  Path(__file__).resolve().parents[1] / name]
    allowed = []
    for candidate in candidates:
        real = candidate.resolve()
        if any(real == root or root in real.parents for root in roots):
            allowed.append(candidate)
    shown = ", ".join(str(r) for r in roots[:2]) + f", ./configs or ${INCLUDE_PATH_ENV}"
    if not allowed:
        raise SdwbError(f"{where}: {name}: outside the directories an include may read ({shown}); "
                        "copy the file there")
    found = next((c for c in allowed if c.is_file()), None)
    if found is None:
        raise SdwbError(f"{where}: {name}: file not found")
    if found.suffix.lower() not in INCLUDE_SUFFIXES:
        raise SdwbError(f"{where}: {name}: expected a YAML file ({' or '.join(INCLUDE_SUFFIXES)})")
    return found
