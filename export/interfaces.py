"""What each exported component looks like from outside: ONE declaration per component.

Why one place: the ONNX export (names, dynamic axes, sample inputs), its validation (tolerance,
a second shape inside the dynamic range), the ONNX Runtime pipeline (names, dtypes) and the
TensorRT optimisation profiles (min/opt/max) must agree, so all of them read a
:class:`ComponentInterface` built here from the pipeline's own configs, never a copy.

Components and their plain-tensor graphs (the wrappers of :mod:`sdwb.components` strip
diffusers' dict outputs and keyword plumbing):

- ``text_encoder``: ``input_ids`` int32 ``[batch, sequence]`` -> ``last_hidden_state``. int32
  because TensorRT prefers it; the wrapper casts to int64 inside the graph.
- ``unet``: ``sample [batch, C, height, width]``, ``timestep`` float32 ``[1]`` (the same t for the
  whole batch, as in diffusers' loop; float so Euler's fractional timesteps fit),
  ``encoder_hidden_states [batch, sequence, D]`` -> ``noise_pred``.
- ``vae_decoder``: ``latent`` -> ``image`` in [-1, 1]. **The 1/scaling_factor is applied inside
  the graph**: ``latent`` is exactly what the scheduler leaves after the last step, so no caller
  can forget it; the ``x/2 + 0.5`` clamp to [0, 1] stays outside (as in diffusers' postprocess).
- SDXL (``family: sdxl`` in the manifest): ``text_encoder`` -> ``hidden_states`` (the
  penultimate layer, as ``StableDiffusionXLPipeline`` uses it), ``text_encoder_2`` ->
  ``hidden_states`` + ``text_embeds`` (the projected pooled embedding); the UNet takes the two
  concatenated as ``encoder_hidden_states`` plus ``text_embeds [batch, P]`` and ``time_ids
  [batch, 6]`` (its ``added_cond_kwargs``).
- ``vae_encoder`` (optional, for img2img): ``image`` in [-1, 1] -> ``latent`` = the posterior
  mean times scaling_factor (deterministic: no sampling inside a graph).

Dynamic ranges (``max_batch`` images per call, default 8; latent side ``s`` = unet sample_size):
the UNet and text encoder see the classifier-free-guidance batch (uncond + cond = 2B), so their
batch axis is 1..2*max_batch with opt 2 (one image under CFG); the VAE sees B: 1..max_batch,
opt 1. Latent height/width run s/2..2s (opt s) in multiples of the UNet's downsampling factor;
the token sequence is dynamic in the graph but pinned to the tokenizer's length in profiles
(diffusers always pads to it). Output dims written ``"height*8"`` are derived from input axes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sdwb.components import (  # noqa: F401  (the modules each graph is traced from; re-exported)
    SdxlTextEncoderWrapper,
    SdxlUNetWrapper,
    TextEncoderWrapper,
    UNetWrapper,
    VaeDecoderWrapper,
    VaeEncoderWrapper,
    pipeline_facts,
    wrapper,
)
from sdwb.variants.manifest import Dim, resolve_dim

COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")
DEFAULT_COMPONENTS = ("text_encoder", "unet", "vae_decoder")  # + text_encoder_2 for SDXL
# SDXL's micro-conditioning: original size (h, w), crop top-left (y, x), target size (h, w).
TIME_IDS = 6


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, numpy dtype name and symbolic shape."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def resolve(self, point: dict[str, int]) -> tuple[int, ...]:
        """The concrete shape at ``point`` (axis name -> size)."""
        return tuple(resolve_dim(d, point) for d in self.shape)

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ComponentInterface:
    """Names, dtypes, dynamic axes with min/opt/max, a second validation point and tolerance."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    axes: dict[str, tuple[int, int, int]]  # dynamic axis -> (min, opt, max)
    second: dict[str, int]  # another point inside the ranges, validated too
    atol: float
    rtol: float
    constants: dict = field(default_factory=dict)  # e.g. the timestep value of the samples

    def point(self, which: str = "opt") -> dict[str, int]:
        """Axis sizes at ``min`` | ``opt`` | ``max`` | ``second``."""
        if which == "second":
            return dict(self.second)
        index = ("min", "opt", "max").index(which)
        return {axis: rng[index] for axis, rng in self.axes.items()}

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx ``dynamic_axes``: tensor -> {dim index: ONNX dim_param}."""
        out: dict[str, dict[int, str]] = {}
        for spec in (*self.inputs, *self.outputs):
            dims = {i: d.replace("*", "_x") for i, d in enumerate(spec.shape) if isinstance(d, str)}
            if dims:
                out[spec.name] = dims
        return out

    def profile(self) -> dict[str, dict[str, list[int]]]:
        """Per input: the ``min``/``opt``/``max`` shapes (TensorRT optimisation profile)."""
        return {
            spec.name: {which: list(spec.resolve(self.point(which))) for which in ("min", "opt", "max")}
            for spec in self.inputs
        }

    def sample_inputs(self, which: str | dict = "opt", seed: int = 0) -> dict[str, np.ndarray]:
        """Seeded random inputs at a named point or an ``{axis: size}`` dict (the graph's dtypes)."""
        point = self.point(which) if isinstance(which, str) else which
        rng = np.random.default_rng(seed)
        feeds = {}
        for spec in self.inputs:
            shape = spec.resolve(point)
            if spec.name == "input_ids":
                feeds[spec.name] = rng.integers(0, self.constants["vocab_size"], shape).astype(spec.dtype)
            elif spec.name == "timestep":
                feeds[spec.name] = np.full(shape, self.constants["timestep"], dtype=spec.dtype)
            else:
                feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        return feeds

    def to_dict(self) -> dict:
        """The manifest entry (names, shapes, axes, profile, tolerance)."""
        return {
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "dynamic_axes": {k: {str(i): n for i, n in v.items()} for k, v in self.dynamic_axes().items()},
            "axes": {k: {"min": v[0], "opt": v[1], "max": v[2]} for k, v in self.axes.items()},
            "profile": self.profile(),
            "tolerance": {"atol": self.atol, "rtol": self.rtol},
        }


# --------------------------------------------------------------------------- declarations


def _side_range(size: int, factor: int) -> tuple[int, int, int]:
    """Latent side (min, opt, max) = (s/2, s, 2s), each a multiple of the UNet's factor."""
    down = lambda v: max(factor, v // factor * factor)
    return down(size // 2), down(size), down(size * 2)


def build_interfaces(
    pipe, components=DEFAULT_COMPONENTS, max_batch: int = 8, atol: float = 1e-3, rtol: float = 1e-3
) -> dict[str, ComponentInterface]:
    """One :class:`ComponentInterface` per requested component of ``pipe``.

    ``atol``/``rtol``: fp32 ONNX Runtime vs PyTorch, ``|ort - torch| <= atol + rtol * |torch|``
    elementwise (the VAE gets twice the atol: its outputs pass through more layers per pixel).
    """
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown:
        raise ValueError(f"unknown component(s) {unknown}: expected some of {', '.join(COMPONENTS)}")
    f = pipeline_facts(pipe)
    c, seq = f["latent_channels"], f["max_length"]
    h_rng = w_rng = _side_range(f["sample_size"], f["unet_factor"])
    cfg = (1, 2, 2 * max_batch)  # uncond + cond; 1 when guidance is off
    images = (1, 1, max_batch)
    second_cfg = min(4, cfg[2])  # two images under CFG, non-square, smallest side
    hw2 = {"height": h_rng[0], "width": w_rng[1]}
    seq_rng = (seq, seq, seq)
    sdxl = f["family"] == "sdxl"
    if sdxl:
        return _sdxl_interfaces(f, components, cfg, second_cfg, seq_rng, h_rng, w_rng, hw2, atol, rtol,
                                images, max_batch)
    decl = {
        "text_encoder": lambda: ComponentInterface(
            "text_encoder",
            inputs=(TensorSpec("input_ids", "int32", ("batch", "sequence")),),
            outputs=(TensorSpec("last_hidden_state", "float32", ("batch", "sequence", f["text_hidden"])),),
            axes={"batch": cfg, "sequence": seq_rng},
            second={"batch": min(3, cfg[2]), "sequence": seq},
            atol=atol, rtol=rtol, constants={"vocab_size": f["vocab_size"]},
        ),
        "unet": lambda: ComponentInterface(
            "unet",
            inputs=(
                TensorSpec("sample", "float32", ("batch", c, "height", "width")),
                TensorSpec("timestep", "float32", (1,)),
                TensorSpec("encoder_hidden_states", "float32", ("batch", "sequence", f["text_hidden"])),
            ),
            outputs=(TensorSpec("noise_pred", "float32", ("batch", c, "height", "width")),),
            axes={"batch": cfg, "height": h_rng, "width": w_rng, "sequence": seq_rng},
            second={"batch": second_cfg, "sequence": seq, **hw2},
            atol=atol, rtol=rtol, constants={"timestep": 500.0},
        ),
        **_vae_interfaces(f, images, max_batch, h_rng, w_rng, hw2, atol, rtol),
    }
    if "text_encoder_2" in components:
        raise ValueError("text_encoder_2: only SDXL pipelines have a second text encoder")
    return {name: decl[name]() for name in components}


def _vae_interfaces(f: dict, images, max_batch: int, h_rng, w_rng, hw2, atol: float, rtol: float) -> dict:
    c, f_img = f["latent_channels"], f["vae_scale_factor"]
    return {
        "vae_decoder": lambda: ComponentInterface(
            "vae_decoder",
            inputs=(TensorSpec("latent", "float32", ("batch", c, "height", "width")),),
            outputs=(TensorSpec("image", "float32", ("batch", 3, f"height*{f_img}", f"width*{f_img}")),),
            axes={"batch": images, "height": h_rng, "width": w_rng},
            second={"batch": min(2, max_batch), **hw2},
            atol=2 * atol, rtol=rtol,
        ),
        "vae_encoder": lambda: ComponentInterface(
            "vae_encoder",
            inputs=(TensorSpec("image", "float32", ("batch", 3, f"height*{f_img}", f"width*{f_img}")),),
            outputs=(TensorSpec("latent", "float32", ("batch", c, "height", "width")),),
            axes={"batch": images, "height": h_rng, "width": w_rng},
            second={"batch": min(2, max_batch), **hw2},
            atol=2 * atol, rtol=rtol,
        ),
    }


def _sdxl_interfaces(f: dict, components, cfg, second_cfg, seq_rng, h_rng, w_rng, hw2, atol, rtol, images,
                     max_batch) -> dict[str, ComponentInterface]:
    """SDXL's declarations: two text encoders (penultimate hidden states, pooled), a UNet with
    ``text_embeds`` and ``time_ids``; the VAE's as for SD."""
    c, seq = f["latent_channels"], f["max_length"]

    def encoder(name: str, hidden: int, pooled: bool) -> ComponentInterface:
        outputs = (TensorSpec("hidden_states", "float32", ("batch", "sequence", hidden)),)
        if pooled:
            outputs += (TensorSpec("text_embeds", "float32", ("batch", f["pooled_dim"])),)
        return ComponentInterface(
            name,
            inputs=(TensorSpec("input_ids", "int32", ("batch", "sequence")),),
            outputs=outputs,
            axes={"batch": cfg, "sequence": seq_rng},
            second={"batch": min(3, cfg[2]), "sequence": seq},
            atol=atol, rtol=rtol, constants={"vocab_size": f["vocab_size"]},
        )

    decl = {
        "text_encoder": lambda: encoder("text_encoder", f["text_hidden"], pooled=False),
        "text_encoder_2": lambda: encoder("text_encoder_2", f["text_hidden_2"], pooled=True),
        "unet": lambda: ComponentInterface(
            "unet",
            inputs=(
                TensorSpec("sample", "float32", ("batch", c, "height", "width")),
                TensorSpec("timestep", "float32", (1,)),
                TensorSpec("encoder_hidden_states", "float32", ("batch", "sequence", f["context_dim"])),
                TensorSpec("text_embeds", "float32", ("batch", f["pooled_dim"])),
                TensorSpec("time_ids", "float32", ("batch", TIME_IDS)),
            ),
            outputs=(TensorSpec("noise_pred", "float32", ("batch", c, "height", "width")),),
            axes={"batch": cfg, "height": h_rng, "width": w_rng, "sequence": seq_rng},
            second={"batch": second_cfg, "sequence": seq, **hw2},
            atol=atol, rtol=rtol, constants={"timestep": 500.0},
        ),
        **_vae_interfaces(f, images, max_batch, h_rng, w_rng, hw2, atol, rtol),
    }
    return {name: decl[name]() for name in components}
