"""Structured channel pruning of a ``UNet2DConditionModel`` through torch-pruning's dependency graph.

Why torch-pruning's graph: a UNet couples channels across skip connections (``torch.cat`` of
up-path and skip), residual adds, the time-embedding projection added into every resnet, GroupNorm
and the split halves of GEGLU; the dependency graph traces one forward and returns each *group* of
channels that must go together. The selection is ours, not ``MetaPruner.step``'s, because in
torch-pruning 1.6 ``round_to`` combined with GroupNorm channel groups over- or under-prunes. Per
group (each pruned by ``ratio``, locally):

- importance: torch-pruning's ``GroupMagnitudeImportance`` (L2 of every coupled weight slice) or
  ``GroupTaylorImportance`` (|w * dL/dw|, gradients of the denoising loss accumulated beforehand);
- coupled copies (GEGLU's two halves) are found by probing the graph and scored together;
- kept width = ``ratio`` removed, rounded to the nearest multiple of ``round_to`` (x the GroupNorm
  groups) where the original width is one; a GroupNorm that normalises exactly this group loses the
  same number of channels from every one of its groups, so the remaining channels keep their
  group. (Where a GroupNorm normalises a concatenation -- up-path + skip -- the group boundaries can
  shift; recovery fine-tuning absorbs that.)

Attention: torch-pruning's graph does not see through ``scaled_dot_product_attention``, so the
query/key/value projections are never group roots (their output width belongs to the heads), and
whole heads are removed separately (:func:`prune_heads`): the lowest-scoring heads of each
``Attention`` go from ``to_q``/``to_k``/``to_v`` (rows) and ``to_out`` (columns) and ``heads`` is
updated, so the head dimension -- and the softmax temperature SDPA derives from it -- is unchanged.

Ignored layers (default ``conv_in``, ``conv_out``, ``time_embedding``) keep their output width; a
group that would change it is left whole (their inputs may still shrink with the layer feeding them).
"""

from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn

from sdwb.errors import SdwbError


def resolve_ignored(unet, patterns: list[str]) -> list[nn.Module]:
    """The modules ``patterns`` (module names or globs) select; one that selects nothing is an error."""
    named = [(n, m) for n, m in unet.named_modules() if n]
    chosen: list[nn.Module] = []
    for pattern in patterns:
        hits = [m for n, m in named if n == pattern or fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise SdwbError(
                f"ignored_layers: {pattern!r} names no module of this UNet (module paths such as conv_in, "
                "time_embedding, down_blocks.0.resnets.0.conv1; globs allowed)"
            )
        chosen += hits
    return chosen


def kept_width(width: int, ratio: float, groups: int, round_to: int) -> int:
    """Channels kept of ``width``: ``ratio`` removed, a multiple of lcm(round_to, groups) where the
    original width is one (else of ``groups``), nearest to the target, at least one step."""
    step = math.lcm(round_to, groups)
    if width % step:
        step = groups if width % groups == 0 else 1
    keep = step * max(1, round(width * (1 - ratio) / step))
    return min(width, keep)


def _importance(kind: str):
    import torch_pruning as tp

    if kind == "taylor":
        return tp.importance.GroupTaylorImportance()
    return tp.importance.GroupMagnitudeImportance(p=2)


def _copies(graph, root: nn.Module, fn) -> int:
    """How many coupled copies of its channels ``root`` has (2 for GEGLU's proj: the two halves)."""
    probe = graph.get_pruning_group(root, fn, [0])
    own = {i for dep, idxs in probe
           if dep.target.module is root and graph.is_out_channel_pruning_fn(dep.handler) for i in idxs}
    return max(1, len(own))


def _norm_groups(group, width: int) -> int:
    """GroupNorm groups of a norm in ``group`` that normalises exactly ``width`` channels (else 1)."""
    found = [dep.target.module.num_groups for dep, _ in group
             if isinstance(dep.target.module, nn.GroupNorm) and dep.target.module.num_channels == width]
    return max(found, default=1)


def _select(score: torch.Tensor, keep: int, groups: int) -> list[int]:
    """Indices to prune: in each of ``groups`` equal blocks keep the top ``keep / groups`` scores."""
    width = len(score)
    size, per = width // groups, keep // groups
    kept: set[int] = set()
    for g in range(groups):
        block = score[g * size:(g + 1) * size]
        kept.update((torch.topk(block, per).indices + g * size).tolist())
    return [i for i in range(width) if i not in kept]


def _attention_modules(unet, ignored: set[int]):
    from diffusers.models.attention_processor import Attention

    for name, m in unet.named_modules():
        if not isinstance(m, Attention) or id(m) in ignored:
            continue
        if getattr(m, "norm_q", None) is not None or getattr(m, "add_k_proj", None) is not None:
            continue  # per-head norms / added KV projections: not handled, left whole
        if not (m.to_q.out_features == m.to_k.out_features == m.to_v.out_features) or m.heads < 2:
            continue
        yield name, m


def plan_heads(unet, ratio: float, kind: str, round_to: int, ignored: set[int]) -> list[tuple]:
    """``(attention, name, dims to remove, heads kept)`` per attention module, scored now (before any
    channel pruning: the query/key/value widths it touches are not changed by the channel groups)."""
    plans = []
    for name, attn in _attention_modules(unet, ignored):
        heads = attn.heads
        head_dim = attn.to_q.out_features // heads
        score = torch.zeros(heads)
        for layer, dim in ((attn.to_q, 0), (attn.to_k, 0), (attn.to_v, 0), (attn.to_out[0], 1)):
            w = layer.weight.detach()
            if kind == "taylor":
                if layer.weight.grad is None:
                    raise SdwbError(f"{name}: no gradient for Taylor importance")
                w = (w * layer.weight.grad).abs()
            else:
                w = w.pow(2)
            per_dim = w.sum(dim=1 - dim)
            score += per_dim.view(heads, head_dim).sum(1)
        allowed = list(range(1, heads + 1))
        if (heads * head_dim) % round_to == 0:  # keep the query width a multiple of round_to
            allowed = [n for n in allowed if (n * head_dim) % round_to == 0] or allowed
        target = heads * (1 - ratio)
        keep = min(allowed, key=lambda n: (abs(n - target), -n))
        if keep == heads:
            continue
        drop = torch.topk(score, heads - keep, largest=False).indices.tolist()
        dims = sorted(h * head_dim + d for h in drop for d in range(head_dim))
        plans.append((attn, name, dims, keep))
    return plans


def prune_heads(plans: list[tuple]) -> dict[str, list[int]]:
    """Remove the planned heads; ``{name: [heads before, heads after]}``."""
    import torch_pruning as tp

    done = {}
    for attn, name, dims, keep in plans:
        before = attn.heads
        for layer in (attn.to_q, attn.to_k, attn.to_v):
            tp.prune_linear_out_channels(layer, dims)
        tp.prune_linear_in_channels(attn.to_out[0], dims)
        attn.heads = keep
        done[name] = [before, keep]
    return done


def prune_channels(unet, config, example_inputs: dict) -> dict:
    """Prune ``unet`` in place per ``config`` (a ``PruneConfig``, method channels); returns a summary.

    With ``config.importance == "taylor"`` the parameters must hold accumulated gradients.
    """
    import torch_pruning as tp

    from sdwb.variants.pruned import sync_attributes

    ignored_roots = resolve_ignored(unet, config.ignored_layers)
    ignored_ids = {id(m) for root in ignored_roots for m in root.modules()}
    head_plans = plan_heads(unet, config.ratio, config.importance, config.round_to, ignored_ids) \
        if config.prune_heads else []
    # q/k/v output widths belong to the heads (the graph cannot follow them through SDPA)
    from diffusers.models.attention_processor import Attention

    qkv = [getattr(a, p) for a in unet.modules() if isinstance(a, Attention)
           for p in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
           if isinstance(getattr(a, p, None), nn.Module)]
    ignored = [m for root in ignored_roots for m in root.modules()] + qkv
    unet.requires_grad_(True)  # the graph is traced through autograd
    try:
        graph = tp.DependencyGraph().build_dependency(
            unet, example_inputs=example_inputs, output_transform=lambda out: out.sample
        )
        scorer = _importance(config.importance)
        plans = []
        for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear]):
            root, fn = group[0].dep.target.module, group[0].dep.handler
            width = graph.get_out_channels(root)
            score = scorer(group)
            if score is None or width is None:
                continue
            copies = _copies(graph, root, fn)
            part = width // copies
            score = score.float().view(copies, part).sum(0)
            norm_groups = _norm_groups(group, part)
            keep = kept_width(part, config.ratio, norm_groups, config.round_to)
            drop = _select(score, keep, norm_groups)
            if drop:
                plans.append((graph._module2name.get(root, "?"), root, fn, part,
                              [i + c * part for c in range(copies) for i in drop], keep))
        widths = {}
        for name, root, fn, part, drop, keep in plans:
            group = graph.get_pruning_group(root, fn, drop)
            if graph.check_pruning_group(group):
                group.prune()
                widths[name] = [part, keep]
        heads = prune_heads(head_plans)
    finally:
        unet.requires_grad_(False)
        for p in unet.parameters():
            p.grad = None
    sync_attributes(unet)
    return {"groups": widths, "heads": heads, "ignored_layers": list(config.ignored_layers)}
