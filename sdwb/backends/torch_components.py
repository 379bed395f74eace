"""A diffusers pipeline's own networks run by the shared denoising loop of the exported backends.

Why: image editing (``sdwb edit``: img2img, inpainting) needs one loop on every backend, so that an
ONNX Runtime edit can be checked against the torch one and a 4-step student edits like its
teacher. :class:`sdwb.backends.onnxruntime.ExportedPipeline` already is diffusers' loop over
component runners; here each runner is the torch module :mod:`sdwb.components` defines for that
component (the very module ``sdwb export onnx`` traces), run in the pipeline's own device and
dtype. Text-to-image on the torch backend stays diffusers' own pipeline.
"""

from __future__ import annotations

import torch

from sdwb.errors import SdwbError


class TorchComponent:
    """A component module as a runner: ``runner(**float32 / int tensors) -> float32 tensor(s)``."""

    def __init__(self, module: torch.nn.Module, device, dtype: torch.dtype):
        self.module, self.device, self.dtype = module, torch.device(device), dtype

    def _cast(self, value: torch.Tensor) -> torch.Tensor:
        value = value.to(self.device)
        return value.to(self.dtype) if value.is_floating_point() else value

    @torch.inference_mode()
    def __call__(self, **inputs: torch.Tensor):
        out = self.module(**{k: self._cast(v) for k, v in inputs.items()})
        if isinstance(out, tuple):
            return tuple(o.float() for o in out)
        return out.float()


def can_encode(pipe) -> bool:
    """Whether ``pipe``'s VAE has a trained encoder (a tiny-decoder variant's AutoencoderTiny has not)."""
    return type(pipe.vae).__name__ != "AutoencoderTiny"


def components_pipeline(pipe):
    """``pipe`` (a diffusers SD / SDXL pipeline) as an ``ExportedPipeline`` over its own modules,
    with the vae_encoder when its VAE can encode; its inference defaults and scheduler carried over."""
    from sdwb.backends.onnxruntime import ExportedPipeline
    from sdwb.components import pipeline_facts, wrapper
    from sdwb.inference import attach, for_pipeline

    if getattr(pipe, "components", None) is None or getattr(pipe, "unet", None) is None:
        raise SdwbError("expected a diffusers Stable Diffusion pipeline")
    facts = pipeline_facts(pipe)
    names = ["text_encoder", "unet", "vae_decoder"]
    if facts["family"] == "sdxl":
        names.insert(1, "text_encoder_2")
    if can_encode(pipe):
        names.append("vae_encoder")
    device, dtype = pipe.unet.device, pipe.unet.dtype
    runners = {}
    for name in names:
        module = wrapper(name, pipe)  # holds the pipeline's own network: its dtype is the inputs'
        runners[name] = TorchComponent(module, device, next(module.parameters()).dtype)
    runner = ExportedPipeline(runners, pipe.tokenizer, pipe.scheduler, facts, device=str(device),
                              info={"backend": "torch", "dtype": str(dtype).replace("torch.", "")},
                              tokenizer_2=getattr(pipe, "tokenizer_2", None))
    attach(runner, for_pipeline(pipe))
    return runner
