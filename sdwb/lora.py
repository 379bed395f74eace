"""LoRA adapters: find and check one, fit it to a pruned UNet, load it into a pipeline or fuse it.

Why here (the core): a LoRA is applied where a pipeline is loaded (``generate``, ``bench``, every
compression verb's source), so every stage gets it the same way. The adapter format is diffusers'
own (``pytorch_lora_weights.safetensors``, keys ``unet.<module>.lora_A/lora_B.weight`` or the older
``lora.down/lora.up``), so what ``sdwb lora train`` writes loads in plain diffusers with
``pipe.load_lora_weights(DIR)``, and adapters trained elsewhere load here.

Pruning changes the widths of the layers an adapter targets. An adapter trained on the unpruned
model is *projected* onto a pruned variant: for a layer whose pruner kept output rows ``O`` and
input columns ``I`` (recorded in the variant's ``architecture.kept``, :mod:`sdwb.variants.kept`),
``A' = A[:, I]`` and ``B' = B[O, :]``, so ``B' A' = (B A)[O][:, I]``: exactly the pruned slice of the
fused weight update. A layer the pruner removed drops its pair (counted); a layer whose widths
changed but whose kept channels were not recorded is refused (a variant pruned before the record
existed: re-run the prune).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdwb.errors import SdwbError

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
ADAPTER_NAME = "sdwb"
RECORD = "sdwb.json"
_PAIR = re.compile(r"^(?P<prefix>unet|text_encoder|text_encoder_2)\.(?P<module>.+)\."
                   r"(?P<part>lora_A|lora_B|lora\.down|lora\.up)\.weight$")
_DOWN = ("lora_A", "lora.down")


@dataclass
class Adapter:
    """A LoRA read from disk: where, its tensors, its record (``sdwb.json``, when sdwb wrote it)."""

    spec: str
    path: Path
    state: dict[str, torch.Tensor]
    sha256: str
    record: dict | None = None
    pairs: dict[str, tuple[str, str]] = field(default_factory=dict)  # "unet.<module>" -> (A key, B key)

    @property
    def rank(self) -> int:
        return max(int(self.state[a].shape[0]) for a, _ in self.pairs.values())

    def components(self) -> list[str]:
        """The pipeline components the adapter changes (``unet``, ``text_encoder``)."""
        return sorted({name.split(".", 1)[0] for name in self.pairs})

    def describe(self) -> dict:
        """What a result or variant record says about the adapter it used."""
        return {"spec": self.spec, "sha256": self.sha256, "rank": self.rank, "pairs": len(self.pairs),
                "components": self.components()}


def resolve_adapter(spec: str) -> Path:
    """The weights file an adapter spec names: ``builtin:<name>``, a directory holding
    ``pytorch_lora_weights.safetensors``, or that file itself."""
    from sdwb.zoo import BUILTIN_PREFIX, get_builtin, missing_message

    if spec.startswith(BUILTIN_PREFIX):
        model = get_builtin(spec)
        if model.kind != "lora":
            raise SdwbError(f"{model.name} is not a LoRA adapter ({model.description.split(';')[0]})")
        if not model.available():
            raise SdwbError(missing_message(model))
        return model.path / WEIGHTS_NAME
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / WEIGHTS_NAME
        if not path.is_file():
            raise SdwbError(f"LoRA directory {path.parent} has no {WEIGHTS_NAME} (diffusers' LoRA layout)")
    elif not path.is_file():
        raise SdwbError(f"LoRA adapter not found: {path.resolve()} (a directory with {WEIGHTS_NAME}, "
                        "or the .safetensors file)")
    if path.suffix != ".safetensors":
        raise SdwbError(f"{path}: LoRA weights must be .safetensors (no pickle)")
    return path


def check_backend(backend: str, where: str) -> None:
    """Refuse a LoRA loaded at run time on an exported backend, in one line (``where``: the flag or
    bench variant that asked): an exported graph is fixed, so the adapter must be fused before."""
    if backend != "torch":
        raise SdwbError(f"{where}: the {backend} backend runs a fixed graph; fuse the LoRA into the model it "
                        "was made from (sdwb lora fuse), then export or quantize the result")


def read_adapter(spec: str) -> Adapter:
    """Read and check the adapter ``spec`` names; every problem is one ``SdwbError`` line."""
    from safetensors.torch import load_file

    from sdwb.hash_cache import sha256_cached
    from sdwb.verify import check_safetensors
    from sdwb.zoo import BUILTIN_PREFIX

    path = resolve_adapter(spec)
    if spec.startswith(BUILTIN_PREFIX):  # a shipped adapter is held to its sdwb-files.json
        from sdwb.verify import verify_builtin

        verify_builtin(spec, path.parent)
    check_safetensors(path)
    try:
        state = load_file(path)
    except Exception as exc:  # header or data damage safetensors itself reports
        raise SdwbError(f"corrupt LoRA weights {path}: {type(exc).__name__}: {exc}") from None
    record = _read_record(path.parent / RECORD)
    sha = sha256_cached(path)
    if record is not None and record.get("sha256") not in (None, sha):
        raise SdwbError(f"{path}: sha256 {sha[:12]} differs from its {RECORD} "
                        f"({str(record['sha256'])[:12]}); the adapter changed after it was written")
    return Adapter(spec=spec, path=path, state=state, sha256=sha, record=record,
                   pairs=lora_pairs(state, path))


def _read_record(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SdwbError(f"corrupt {path}: {exc}") from None
    return data if isinstance(data, dict) else None


def lora_pairs(state: dict[str, torch.Tensor], source: Path | str = "LoRA") -> dict[str, tuple[str, str]]:
    """``{"unet.<module>": (A key, B key)}`` of a diffusers/peft LoRA state dict, checked: every key is a
    LoRA matrix of a known component, every A has its B, ranks agree, no NaN/inf."""
    downs, ups = {}, {}
    for key, tensor in state.items():
        if key.endswith(".alpha"):
            raise SdwbError(f"{source}: '{key}': kohya-style alphas are not supported; convert the adapter "
                            "with diffusers (load_lora_weights, then save_lora_weights)")
        m = _PAIR.match(key)
        if m is None:
            raise SdwbError(f"{source}: '{key}' is not a LoRA matrix of unet / text_encoder "
                            "(expected diffusers' <component>.<module>.lora_A|lora_B.weight)")
        if tensor.ndim != 2:
            raise SdwbError(f"{source}: '{key}' has {tensor.ndim} dims; only Linear-layer LoRAs are "
                            "supported")
        if not torch.isfinite(tensor).all():
            raise SdwbError(f"{source}: '{key}' holds NaN/inf")
        name = f"{m['prefix']}.{m['module']}"
        (downs if m["part"] in _DOWN else ups)[name] = key
    if not downs:
        raise SdwbError(f"{source}: no LoRA matrices in it")
    unpaired = sorted(set(downs) ^ set(ups))
    if unpaired:
        raise SdwbError(f"{source}: {unpaired[0]} has only one of its two LoRA matrices")
    pairs = {name: (downs[name], ups[name]) for name in sorted(downs)}
    for name, (a, b) in pairs.items():
        if state[a].shape[0] != state[b].shape[1]:
            raise SdwbError(f"{source}: {name}: A has rank {state[a].shape[0]}, B {state[b].shape[1]}")
    return pairs


def project(adapter: Adapter, unet, kept: dict | None) -> tuple[dict[str, torch.Tensor], int]:
    """The adapter's state dict fitted to ``unet`` (pruned or not) and how many pairs were dropped
    because their layer is gone. ``kept``: ``{module: {"out": [...], "in": [...]}}`` of the pruned
    variant (None for an unpruned model). Shapes that still differ are one ``SdwbError`` line."""
    modules = dict(unet.named_modules())
    pruned = kept is not None
    kept = kept or {}
    state, dropped = {}, 0
    for name, (a_key, b_key) in adapter.pairs.items():
        component, module_name = name.split(".", 1)
        a, b = adapter.state[a_key], adapter.state[b_key]
        if component != "unet":
            state[a_key], state[b_key] = a, b
            continue
        layer = modules.get(module_name)
        if layer is None:
            if pruned:
                dropped += 1  # a block pruning removed this layer
                continue
            raise SdwbError(f"{adapter.spec}: targets unet.{module_name}, which this UNet does not have "
                            "(an adapter for another architecture?)")
        if not isinstance(layer, torch.nn.Linear):
            raise SdwbError(f"{adapter.spec}: unet.{module_name} is a {type(layer).__name__}, not a Linear "
                            "layer")
        rows = kept.get(module_name, {})
        if "in" in rows:
            a = a[:, rows["in"]]
        if "out" in rows:
            b = b[rows["out"], :]
        if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
            why = ("its kept channels were not recorded (pruned before sdwb recorded them: re-run the prune)"
                   if pruned and not rows else "another architecture")
            raise SdwbError(f"{adapter.spec}: unet.{module_name} is {layer.in_features}->"
                            f"{layer.out_features} here, the adapter's {a.shape[1]}->{b.shape[0]}: {why}")
        state[a_key], state[b_key] = a.contiguous(), b.contiguous()
    return state, dropped


def apply_lora(pipe, adapter: Adapter, scale: float = 1.0, *, fuse: bool = False,
               kept: dict | None = None) -> dict:
    """Load ``adapter`` into ``pipe`` (diffusers + peft) at ``scale``; with ``fuse`` merge it into the
    weights and drop the peft layers (plain ``nn.Linear`` again: what quantizers and exporters need).
    Returns what to record: the adapter's identity, scale, route and pairs dropped by pruning."""
    from diffusers.utils import logging as diffusers_logging

    if not pipe.__class__.__name__.startswith("StableDiffusion"):
        raise SdwbError(f"LoRA: {pipe.__class__.__name__} is not a diffusers Stable Diffusion pipeline")
    state, dropped = project(adapter, pipe.unet, kept)
    if not state:
        raise SdwbError(f"{adapter.spec}: none of its layers exist in this (pruned) UNet")
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "no LoRA keys for CLIPTextModel" is expected, not news
    try:
        pipe.load_lora_weights(dict(state), adapter_name=ADAPTER_NAME)
        if fuse:
            pipe.fuse_lora(lora_scale=scale, adapter_names=[ADAPTER_NAME])
            pipe.unload_lora_weights()
        else:
            pipe.set_adapters([ADAPTER_NAME], [scale])
    except SdwbError:
        raise
    except Exception as exc:  # peft / diffusers refusing the adapter: one line, named
        raise SdwbError(f"{adapter.spec}: could not load the LoRA: {type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:300]}") from None
    finally:
        diffusers_logging.set_verbosity(level)
    return {**adapter.describe(), "scale": scale, "route": "fused" if fuse else "unfused",
            "pairs_dropped": dropped}
