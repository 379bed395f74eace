"""Which rows and columns of each Linear layer a pruning kept, read back from the weights.

Why: an adapter (LoRA) trained on the unpruned model must be cut to the pruned widths
(:func:`sdwb.lora.project`), which needs the kept output rows and input columns of every layer it
targets. The pruners (torch-pruning groups, attention heads, block removal) do not report indices
in one form, but every one of them *selects* entries: right after pruning, before any recovery
training, a pruned weight is exactly ``W[rows][:, cols]`` of its parent. So the indices are found
by locating the pruned weight's values in the parent's (an anchor row gives the columns, an anchor
column the rows; values unique in the parent) and then checked bit for bit. A layer that cannot be
matched unambiguously is left out (an adapter targeting it is then refused, never guessed).
"""

from __future__ import annotations

import torch
from torch import nn

_ANCHORS = 8  # rows / columns tried as anchors before a layer is given up as ambiguous


def _locate(sorted_values: torch.Tensor, order: torch.Tensor, queries: torch.Tensor) -> torch.Tensor | None:
    """Flat positions of ``queries`` in the parent weight, or None when any is absent or repeated."""
    left = torch.searchsorted(sorted_values, queries, right=False)
    right = torch.searchsorted(sorted_values, queries, right=True)
    if not bool(((right - left) == 1).all()):
        return None
    return order[left]


def _match(parent: torch.Tensor, child: torch.Tensor) -> tuple[list[int], list[int]] | None:
    """``(rows, cols)`` with ``parent[rows][:, cols] == child`` exactly, or None."""
    flat = parent.detach().flatten().float()
    sorted_values, order = torch.sort(flat)
    width = parent.shape[1]
    child = child.detach().float()
    for k in range(min(_ANCHORS, *child.shape)):
        across = _locate(sorted_values, order, child[k].contiguous())  # anchor row k -> every column
        down = _locate(sorted_values, order, child[:, k].contiguous())  # anchor column k -> every row
        if across is None or down is None:
            continue
        cols, rows = (across % width).tolist(), (down // width).tolist()
        if parent.detach().float()[rows][:, cols].equal(child):
            return rows, cols
    return None


def trace_kept(parent_unet: nn.Module, pruned_unet: nn.Module) -> dict:
    """``{module: {"out": rows, "in": cols}}`` for every Linear layer of ``pruned_unet`` whose shape
    differs from its parent's (a key only for the dimension that changed), plus ``"untraced"``: the
    layers whose indices could not be matched. Call it before recovery changes the weights."""
    parents = {name: m for name, m in parent_unet.named_modules() if isinstance(m, nn.Linear)}
    kept, untraced = {}, []
    for name, layer in pruned_unet.named_modules():
        parent = parents.get(name)
        if not isinstance(layer, nn.Linear) or parent is None or layer.weight.shape == parent.weight.shape:
            continue
        found = _match(parent.weight, layer.weight)
        if found is None:
            untraced.append(name)
            continue
        rows, cols = found
        entry = {}
        if len(rows) != parent.out_features:
            entry["out"] = rows
        if len(cols) != parent.in_features:
            entry["in"] = cols
        kept[name] = entry
    return {"layers": kept, "untraced": untraced}


def find_kept(record: dict | None) -> dict | None:
    """The kept channels of the pruned variant in ``record``'s chain (``{module: {...}}``), ``{}`` for
    a pruned variant that predates the record, None when nothing in the chain was pruned."""
    from sdwb.variants.pruned import find_architecture

    architecture = find_architecture(record)
    if architecture is None:
        return None
    return dict((architecture.get("kept") or {}).get("layers") or {})
