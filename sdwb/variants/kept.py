"""Which rows and columns of each Linear layer a pruning kept, recorded while it prunes.

Why: an adapter (LoRA) trained on the unpruned model must be cut to the pruned widths
(:func:`sdwb.lora.project`), which needs the kept output rows and input columns of every layer it
targets. Every torch-pruning function (dependency groups, attention heads) slices a weight through
one method, ``BasePruningFunc._prune_parameter_and_grad(weight, keep_idxs, dim)``; :func:`recording`
wraps it for the duration of a pruning and composes the kept indices per Linear layer (a layer
pruned twice along one dimension keeps the indices of the indices). Exact by construction, whatever
the weights' values (reading the indices back from the weights fails on fp16-stored models, whose
weights repeat values).
"""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn


@contextmanager
def recording(unet: nn.Module):
    """Inside the block, every torch-pruning slice of a Linear weight of ``unet`` is recorded; yields
    ``{module: {"out": rows, "in": cols}}`` (only the dimensions that were cut), filled as it prunes."""
    from torch_pruning.pruner.function import BasePruningFunc

    names = {id(m.weight): n for n, m in unet.named_modules() if isinstance(m, nn.Linear)}
    kept: dict[str, dict[str, list[int]]] = {}
    original = BasePruningFunc._prune_parameter_and_grad

    def slice_and_record(self, weight, keep_idxs, pruning_dim):
        new = original(self, weight, keep_idxs, pruning_dim)
        name = names.pop(id(weight), None)  # ids of live weights only: the old one is replaced now
        if name is not None:
            names[id(new)] = name
            if weight.dim() == 2 and pruning_dim in (0, 1):
                key = "out" if pruning_dim == 0 else "in"
                before = kept.setdefault(name, {}).get(key) or list(range(weight.shape[pruning_dim]))
                kept[name][key] = [before[int(i)] for i in keep_idxs]
        return new

    BasePruningFunc._prune_parameter_and_grad = slice_and_record
    try:
        yield kept
    finally:
        BasePruningFunc._prune_parameter_and_grad = original


def find_kept(record: dict | None) -> dict | None:
    """The kept channels of the pruned variant in ``record``'s chain (``{module: {...}}``), ``{}`` for
    a pruned variant that predates the record, None when nothing in the chain was pruned."""
    from sdwb.variants.pruned import find_architecture

    architecture = find_architecture(record)
    if architecture is None:
        return None
    return dict((architecture.get("kept") or {}).get("layers") or {})
