"""The quantization method registry: one typed config and one applier per method, found by name.

Why a registry (torchao's ``quantize_(model, Config())`` with a handler per config type is the
model): the method list, the ``QuantConfig`` union, the ``--method`` help, the device checks and
the docs are all read from here, so they cannot drift apart. A torch method is one module under
:mod:`sdwb.quant.methods` holding its config class (``@register``) and its applier
(``@applies``); nothing else changes. ONNX Runtime graph methods register their config in
:mod:`sdwb.quant.ort_methods` (the core must read every variant's record) and their graph
quantizer in ``compress.ort_variant`` (quantizing a graph needs an exported graph); the OpenVINO
(NNCF) methods likewise in :mod:`sdwb.quant.ov_methods` and ``compress.ov_variant``.
"""

from __future__ import annotations

from typing import Callable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from sdwb.yaml_io import Scheduler

Component = Literal["unet", "text_encoder", "vae_decoder"]
COMPONENTS: tuple[str, ...] = ("unet", "text_encoder", "vae_decoder")
DEFAULT_KEEP_FP32 = ["GroupNorm", "LayerNorm", "conv_out", "time_embedding"]


class Strict(BaseModel):
    """Unknown keys and loose types are errors: a typo must fail before a model is loaded."""

    model_config = ConfigDict(extra="forbid", strict=True)


class GuardConfig(Strict):
    """The probe generation run after quantizing: refuse to save on NaN/inf or low fidelity."""

    enabled: bool = Field(True, description="false skips the probe (recorded in sdwb.json)")
    prompts: int = Field(2, ge=1, le=64, description="probe prompts from the shapes train stream")
    prompt_offset: int = Field(1_000_000, ge=0, description="train-stream seed of the first probe prompt")
    steps: int = Field(10, ge=1, le=200)
    guidance: float = Field(7.5, ge=0.0)
    scheduler: Scheduler = "ddim"
    seed: int = Field(0, ge=0, description="probe image i starts from the noise of seed + i")
    min_psnr: float = Field(20.0, description="dB vs the float model's images for the same prompts/seeds")


class CalibrationConfig(Strict):
    """Activations gathered along real denoising trajectories (Q-Diffusion / PTQ4DM style)."""

    prompts: int = Field(8, ge=1, le=4096, description="calibration prompts (shapes train stream)")
    prompt_offset: int = Field(0, ge=0, description="train-stream seed of the first calibration prompt")
    steps: int = Field(20, ge=1, le=1000, description="denoising steps of each calibration trajectory")
    timesteps: Union[Literal["all"], int] = Field(
        10, description="'all' steps or K steps spread evenly over the whole trajectory (first and last kept)"
    )
    guidance: float = Field(7.5, ge=0.0, description="> 1: both CFG halves are recorded (one 2B call)")
    scheduler: Scheduler = "ddim"
    seed: int = Field(0, ge=0, description="trajectory i starts from the noise of seed + i")
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    height: Optional[int] = Field(
        None, ge=64, multiple_of=64, description="image height of the trajectories (None: the model's own)"
    )
    width: Optional[int] = Field(
        None, ge=64, multiple_of=64, description="image width of the trajectories (None: the model's own)"
    )


class MethodConfig(Strict):
    """What every method's config has: the components it covers and the guard run after it."""

    components: list[Component] = Field(default_factory=lambda: ["unet"], min_length=1)
    guard: GuardConfig = Field(default_factory=GuardConfig)


# method name -> config class, in registration order (the order of help texts and docs).
METHODS: dict[str, type[MethodConfig]] = {}
# method name -> {"backend": what the variant runs on, "device": "cpu" | "cuda" | "cpu or cuda"}.
METHOD_INFO: dict[str, dict[str, str]] = {}
# method name -> why it cannot run on the other kind of device (for the one-line refusal).
REFUSALS: dict[str, str] = {}
# method name -> a check that its optional library is importable (raises the one-line SdwbError).
REQUIREMENTS: dict[str, Callable[[], object]] = {}
# torch method name -> applier ``(pipe, config, device, state) -> summary`` (in place on pipe).
APPLIERS: dict[str, Callable] = {}


def register(
    *,
    backend: Literal["torch", "onnxruntime", "openvino"],
    device: str,
    why: str = "",
    needs: Callable[[], object] | None = None,
):
    """Class decorator: register a method config (its ``method`` literal is its name).

    ``device``: ``"cpu"``, ``"cuda"`` or ``"cpu or cuda"``; ``why``: the reason it cannot run
    elsewhere, shown when it is asked to (``"torch-fp16: not supported on this device (cpu): …"``);
    ``needs``: raises a one-line error when the method's optional library is missing.
    """
    if device not in ("cpu", "cuda", "cpu or cuda"):
        raise ValueError(f"device {device!r}: expected cpu, cuda or 'cpu or cuda'")

    def add(cls: type[MethodConfig]) -> type[MethodConfig]:
        name = cls.model_fields["method"].default
        if name in METHODS:
            raise ValueError(f"quantization method {name!r} registered twice")
        METHODS[name] = cls
        METHOD_INFO[name] = {"backend": backend, "device": device}
        if why:
            REFUSALS[name] = why
        if needs is not None:
            REQUIREMENTS[name] = needs
        return cls

    return add


def applies(*configs: type[MethodConfig]):
    """Function decorator: ``fn`` applies the torch methods of ``configs`` to a pipeline in place."""

    def add(fn: Callable) -> Callable:
        for cls in configs:
            APPLIERS[cls.model_fields["method"].default] = fn
        return fn

    return add
