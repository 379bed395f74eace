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
- GroupNorm: every GroupNorm the group reaches counts, also one that normalises a concatenation
  (up-path + skip, where this group is one part). The kept width of each coupled part is a
  multiple of the lcm of their ``num_groups`` (and of ``round_to`` where the width is a multiple
  of that too): each part of a concatenation then loses a multiple of the groups, so every norm
  still splits into its groups whatever the widths (SD 1.x/2.x: 32 groups over 320..1280
  channels; small test widths such as 32/64). A part whose width is not a multiple of its norms'
  groups, or whose ratio rounds to nothing removed (32 channels, 32 groups), is left whole.
  Selection keeps the same number of channels in each norm group the part covers whole (the norm
  of exactly this width; a concatenation whose group boundaries fall on the part's edges), so the
  remaining channels keep their group; elsewhere in a concatenation the boundaries can shift,
  which recovery fine-tuning absorbs. Every GroupNorm of the result is checked before returning.
- kept width = ``ratio`` removed, rounded to the nearest such multiple, at least one multiple, so
  the ratio is met only approximately: the summary gives per group the requested and kept widths,
  the groups left whole and why, and the fraction of UNet parameters actually removed
  (:func:`outcome_line`).

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
from dataclasses import dataclass

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
    """Channels kept of ``width`` whose GroupNorm has ``groups`` groups (:func:`plan_width`): ``ratio``
    removed, a multiple of lcm(round_to, groups) where the original width is one (else of
    ``groups``), nearest to the target, at least one step; ``width`` where it is not a multiple of
    ``groups``."""
    return plan_width(width, ratio, NormNeeds(groups, groups), round_to)[0]


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


@dataclass(frozen=True)
class NormNeeds:
    """What the GroupNorms of one dependency group ask of its kept width (per coupled part).

    ``groups``: lcm of the ``num_groups`` of every GroupNorm the group's channels reach, those over a
    concatenation (up-path + skip) included -- the kept width must be a multiple of it, so every
    part of a concatenation loses a multiple of its groups and the total still splits. ``blocks``:
    lcm of the number of norm groups the part spans in each norm whose groups it covers whole and
    in order (the norm of exactly this width; a concatenation whose group boundaries fall on the
    part's edges); ``_select`` keeps the same count in each of these equal blocks, so the kept
    channels stay in their norm group. ``names``: the norms, for the summary.
    """

    groups: int = 1
    blocks: int = 1
    names: tuple[str, ...] = ()


def _norm_needs(graph, group, part: int, copies: int) -> NormNeeds:
    """The :class:`NormNeeds` of ``group`` (whose root has ``copies`` coupled parts of ``part``)."""
    groups, blocks, names = 1, 1, []
    for item in group:
        dep, idxs = item.dep, item.idxs
        norm = dep.target.module
        if not isinstance(norm, nn.GroupNorm) or not idxs:
            continue
        names.append(graph._module2name.get(norm, "?"))
        groups = math.lcm(groups, norm.num_groups)
        size = norm.num_channels // norm.num_groups  # channels per norm group
        roots = getattr(item, "root_idxs", None) or list(range(len(idxs)))
        at = dict(zip(roots, idxs))  # root channel -> norm channel, where each maps to exactly one
        offset = at.get(0, -1)
        in_order = copies == 1 and len(idxs) == len(at) == part and all(at.get(r) == offset + r
                                                                        for r in range(part))
        if in_order and offset % size == 0 and part % size == 0:
            blocks = math.lcm(blocks, part // size)
    return NormNeeds(groups, blocks, tuple(names))


def plan_width(width: int, ratio: float, needs: NormNeeds, round_to: int) -> tuple[int, int, str | None]:
    """``(kept, multiple, why it is left whole or None)`` for one part of ``width`` channels.

    The multiple is lcm(norm groups, select blocks, round_to) where ``width`` is a multiple of it,
    else lcm(norm groups, select blocks): ``round_to`` is a preference, the GroupNorm constraint is
    not (without norms this is :func:`kept_width`'s rule). Where ``width`` is not a multiple even
    of the norm constraint the group is left whole. Kept = ``ratio`` removed, rounded to the nearest
    multiple, at least one multiple; a kept width equal to ``width`` (ratio too small for the
    multiple) also leaves the group whole, and says why.
    """
    hard = math.lcm(needs.groups, needs.blocks)
    if width % hard:
        return width, hard, (f"{width} channels are not a multiple of the {needs.groups} GroupNorm groups "
                             f"of {', '.join(needs.names)}")
    step = math.lcm(hard, round_to)
    if width % step:
        step = hard
    keep = min(width, step * max(1, round(width * (1 - ratio) / step)))
    if keep < width:
        return keep, step, None
    forced = f"GroupNorm {needs.groups} groups" if needs.groups > 1 else ""
    if step % round_to == 0 and round_to > 1 and step != needs.groups:
        forced = f"{forced} and round_to {round_to}" if forced else f"round_to {round_to}"
    return width, step, (f"{width} channels kept in multiples of {step}"
                         f"{f' ({forced})' if forced else ''}: ratio {ratio:g} rounds to nothing removed")


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


def group_norm_problems(unet) -> list[str]:
    """``"NAME: C channels / G groups"`` for every GroupNorm of ``unet`` whose channels (its weight's
    length) do not split into its groups; empty when the UNet is sound."""
    return [f"{name}: {m.weight.shape[0]} channels / {m.num_groups} groups"
            for name, m in unet.named_modules()
            if isinstance(m, nn.GroupNorm) and m.weight is not None and m.weight.shape[0] % m.num_groups]


def _check_group_norms(unet) -> None:
    """Refuse (one line) a pruned UNet with a GroupNorm its groups do not divide: the plan keeps
    every part a multiple of its norms' groups, so this is a bug, named here rather than as a
    shape error deep in diffusers' forward."""
    bad = group_norm_problems(unet)
    if bad:
        shown = "; ".join(bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise SdwbError(f"channel pruning left {len(bad)} GroupNorm(s) whose channels do not split into "
                        f"their groups ({shown}); nothing was written -- please report this with the "
                        "model's unet/config.json")


def _count(unet) -> int:
    return sum(p.numel() for p in unet.parameters())


def _nothing_removed(ratio: float, group_plan: dict, left_whole: dict) -> str:
    """The one-line refusal when ``ratio`` removes no channel and no head: which groups were left whole
    and why, and the smallest ratio that would remove channels (a group of ``w`` channels kept in
    multiples of ``m`` loses one multiple once ``ratio > m / (2 w)``), or that none can."""
    if not left_whole:
        return f"ratio {ratio:g} removes nothing from this UNet: it has no prunable channel group or head"
    name, why = next(iter(left_whole.items()))
    above = [g["multiple_of"] / (2 * g["width"]) for g in group_plan.values()
             if g["width"] > g["multiple_of"] and g["width"] % g["multiple_of"] == 0]
    least = math.floor(min(above, default=1) * 100 + 1e-9) / 100 + 0.01  # strictly above the threshold
    hint = (f"a ratio of at least {least:.2f} would remove channels" if above else
            "no ratio can: every group is a single multiple (its width needs at least twice its GroupNorm "
            "groups)")
    return (f"ratio {ratio:g} removes nothing from this UNet: all {len(left_whole)} channel groups were left "
            f"whole and no attention head goes (e.g. {name}: {why}); {hint}")


def outcome_line(summary: dict) -> str:
    """One line: the ratio asked for, the fraction of UNet parameters removed, what forced the
    difference, and how many groups were left whole (``prune`` prints it; sdwb.json records it)."""
    steps = sorted({g["multiple_of"] for g in summary["group_plan"].values() if g.get("norm_groups", 1) > 1})
    norms = summary["norm_groups"]
    forced = []
    if norms and steps:
        forced.append(f"GroupNorm {'/'.join(map(str, norms))} groups force multiples of "
                      f"{'/'.join(map(str, steps))}")
    elif summary["round_to"] > 1:
        forced.append(f"widths in multiples of {summary['round_to']}")
    n = summary["left_whole_count"]
    forced.append(f"{n} group{'s' if n != 1 else ''} left whole" if n else "every group pruned")
    heads = summary["heads"]
    if heads:
        forced.append(f"heads removed in {len(heads)} attention modules")
    return (f"ratio {summary['requested_ratio']:g} requested: {summary['achieved_param_ratio']:.2f} of UNet "
            f"parameters removed ({'; '.join(forced)})")


def prune_channels(unet, config, example_inputs: dict) -> dict:
    """Prune ``unet`` in place per ``config`` (a ``PruneConfig``, method channels); returns a summary.

    The summary (recorded under ``metrics.pruned`` in the variant's sdwb.json) says what was asked
    and what was done, since the GroupNorm and ``round_to`` multiples rarely allow the exact ratio:
    ``groups`` (``{root: [width, kept]}`` of every pruned group), ``group_plan`` (per group: width,
    requested, kept, multiple, the norms' groups, and why it was left whole where it was),
    ``left_whole`` / ``left_whole_count``, ``requested_ratio``, ``achieved_param_ratio`` (fraction
    of UNet parameters removed, heads included), ``achieved_channel_ratio`` (fraction of the
    planned groups' channels removed), ``norm_groups``, ``heads`` and ``outcome`` (one line).

    With ``config.importance == "taylor"`` the parameters must hold accumulated gradients.
    """
    import torch_pruning as tp

    from sdwb.variants.pruned import sync_attributes

    params_before = _count(unet)
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
        plans, group_plan, left_whole = [], {}, {}
        for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear]):
            root, fn = group[0].dep.target.module, group[0].dep.handler
            width = graph.get_out_channels(root)
            score = scorer(group)
            if score is None or width is None:
                continue
            name = graph._module2name.get(root, "?")
            copies = _copies(graph, root, fn)
            part = width // copies
            score = score.float().view(copies, part).sum(0)
            needs = _norm_needs(graph, group, part, copies)
            keep, step, why = plan_width(part, config.ratio, needs, config.round_to)
            group_plan[name] = {"width": part, "requested": round(part * (1 - config.ratio), 2), "kept": keep,
                                "multiple_of": step, "norm_groups": needs.groups}
            if why:
                left_whole[name] = why
                continue
            drop = _select(score, keep, needs.blocks)
            plans.append((name, root, fn, part, [i + c * part for c in range(copies) for i in drop], keep))
        widths = {}
        for name, root, fn, part, drop, keep in plans:
            group = graph.get_pruning_group(root, fn, drop)
            if graph.check_pruning_group(group):
                group.prune()
                widths[name] = [part, keep]
            else:
                left_whole[name] = "torch-pruning refused the group (check_pruning_group)"
                group_plan[name]["kept"] = part
        for name, why in left_whole.items():
            group_plan[name]["left_whole"] = why
        heads = prune_heads(head_plans)
    finally:
        unet.requires_grad_(False)
        for p in unet.parameters():
            p.grad = None
    if not widths and not heads:
        raise SdwbError(_nothing_removed(config.ratio, group_plan, left_whole))
    _check_group_norms(unet)
    sync_attributes(unet)
    planned = sum(g["width"] for g in group_plan.values())
    summary = {
        "requested_ratio": config.ratio,
        "achieved_param_ratio": round(1 - _count(unet) / params_before, 4),
        "achieved_channel_ratio": round(1 - sum(g["kept"] for g in group_plan.values()) / planned, 4)
        if planned else 0.0,
        "round_to": config.round_to,
        "norm_groups": sorted({m.num_groups for m in unet.modules() if isinstance(m, nn.GroupNorm)}),
        "groups": widths,
        "group_plan": group_plan,
        "left_whole": left_whole,
        "left_whole_count": len(left_whole),
        "heads": heads,
        "ignored_layers": list(config.ignored_layers),
    }
    summary["outcome"] = outcome_line(summary)
    return summary
