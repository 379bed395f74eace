"""Stable Diffusion on ONNX Runtime: one session per exported component, torch's denoising loop.

Why the loop is diffusers' own, line for line: images must match the torch backend for the same
seed, so prompt encoding (pad to the tokenizer length, uncond = ""), latents (drawn on the CPU
with ``torch.Generator(seed + i)``, times ``init_noise_sigma``), ``scale_model_input``, the CFG
batch (uncond + cond in one 2B call), ``uncond + g * (cond - uncond)``, ``scheduler.step`` with
the same extra kwargs and the ``x/2 + 0.5`` clamp are all done with the same diffusers scheduler
objects on torch tensors; only the three networks run elsewhere. :class:`ExportedPipeline`
holds that loop and takes any *component runner* (``runner(**inputs) -> tensor``), so the
TensorRT runner (``export/tensorrt.py``) reuses it unchanged.

Per-component time: every runner call goes through :meth:`ExportedPipeline.run_component`, which
calls each function in ``pipe.hooks`` with ``(component, seconds)`` (CUDA synchronised first);
:meth:`ExportedPipeline.record_timings` collects them for the benchmark.

Providers: CPU here; with onnxruntime-gpu, CUDA first then CPU by default, and TensorRT when
asked for (``providers=["tensorrt", "cuda", "cpu"]``: it builds engines when a session opens,
minutes for SD 1.5, cached under ``trt_cache``). On a GPU provider the loop's tensors live on
the GPU and are bound to the sessions with IO binding (no host round trip per step).
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from sdwb.errors import SdwbError
from sdwb.inference import DEFAULT_GUIDANCE, DEFAULT_STEPS
from sdwb.variants.manifest import read_manifest, resolve_dim, verify_manifest

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int32": torch.int32,
                "int64": torch.int64}


def input_point(entry: dict, shapes: dict[str, Sequence[int]]) -> dict[str, int]:
    """Axis sizes implied by concrete input shapes (``"height*8"`` of 64 -> height 8)."""
    point = {}
    for spec in entry["inputs"]:
        for dim, size in zip(spec["shape"], shapes[spec["name"]]):
            if isinstance(dim, str):
                axis, _, factor = dim.partition("*")
                point[axis] = size // (int(factor) if factor else 1)
    return point


def output_shape(entry: dict, shapes: dict[str, Sequence[int]]) -> tuple[int, ...]:
    """The first output's concrete shape for these input shapes (from the manifest's symbols)."""
    point = input_point(entry, shapes)
    return tuple(resolve_dim(d, point) for d in entry["outputs"][0]["shape"])


class OrtComponent:
    """One ``ort.InferenceSession`` as a runner: ``runner(**torch tensors) -> torch tensor``."""

    def __init__(self, name: str, session, entry: dict, device: str = "cpu"):
        self.name, self.session, self.entry, self.device = name, session, entry, torch.device(device)
        self.dtypes = {s["name"]: s["dtype"] for s in entry["inputs"]}
        self.output = entry["outputs"][0]
        self.output_names = [o["name"] for o in entry["outputs"]]

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The output tensor; a tuple when the graph has several (SDXL's second text encoder)."""
        if self.device.type == "cuda" and len(self.output_names) == 1:
            return self._run_bound(inputs)
        feeds = {k: v.detach().cpu().numpy().astype(self.dtypes[k], copy=False) for k, v in inputs.items()}
        outs = [torch.from_numpy(o).to(self.device) for o in self.session.run(self.output_names, feeds)]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _run_bound(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """IO binding: the session reads and writes the torch CUDA tensors in place."""
        index = self.device.index or 0
        binding = self.session.io_binding()
        keep = []
        for name, tensor in inputs.items():
            tensor = tensor.to(self.device, TORCH_DTYPES[self.dtypes[name]]).contiguous()
            keep.append(tensor)
            binding.bind_input(name, "cuda", index, np.dtype(self.dtypes[name]).type, tuple(tensor.shape),
                               tensor.data_ptr())
        shape = output_shape(self.entry, {k: tuple(v.shape) for k, v in zip(inputs, keep)})
        out = torch.empty(shape, dtype=TORCH_DTYPES[self.output["dtype"]], device=self.device)
        binding.bind_output(self.output["name"], "cuda", index, np.dtype(self.output["dtype"]).type, shape,
                            out.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # inputs written by torch kernels
        binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return out


class ExportedPipeline:
    """diffusers' StableDiffusionPipeline loop over component runners (ONNX Runtime, TensorRT)."""

    def __init__(self, components: dict, tokenizer, scheduler, facts: dict, device: str = "cpu",
                 info: dict | None = None, tokenizer_2=None):
        self.family = facts.get("family", "sd1")  # exports made before families held SD 1.x / 2.x
        needed = ("text_encoder", "text_encoder_2", "unet", "vae_decoder") if self.family == "sdxl" else \
            ("text_encoder", "unet", "vae_decoder")
        missing = [c for c in needed if c not in components]
        if missing:
            raise SdwbError(f"export lacks component(s) {', '.join(missing)} needed to generate images")
        if self.family == "sdxl" and tokenizer_2 is None:
            raise SdwbError("SDXL export lacks its second tokenizer (tokenizer_2/)")
        self.components, self.tokenizer, self.scheduler = components, tokenizer, scheduler
        self.tokenizer_2 = tokenizer_2
        self.facts, self.device, self.info = facts, torch.device(device), info or {}
        self.hooks: list[Callable[[str, float], None]] = []
        self.last_batch: dict[str, int] = {}
        self.manifest: dict = {}

    # ---------------------------------------------------------------- timing
    def run_component(self, name: str, **inputs: torch.Tensor) -> torch.Tensor:
        """Run one component; report ``(name, seconds)`` to every hook.

        ``last_batch[name]`` is the leading dim of the call's first input (the benchmark reads
        it to tell the 2B guidance batch of the UNet from the B of the VAE).
        """
        first = next(iter(inputs.values()), None)
        if first is not None and first.dim():
            self.last_batch[name] = int(first.shape[0])
        started = time.perf_counter()
        out = self.components[name](**inputs)
        if self.hooks:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - started
            for hook in self.hooks:
                hook(name, seconds)
        return out

    @contextlib.contextmanager
    def record_timings(self):
        """``with pipe.record_timings() as log:`` -> ``log[component]`` = list of seconds per call."""
        log: dict[str, list[float]] = defaultdict(list)
        hook = lambda name, seconds: log[name].append(seconds)
        self.hooks.append(hook)
        try:
            yield log
        finally:
            self.hooks.remove(hook)

    def sample_inputs(self, name: str, point: dict[str, int] | None = None, seed: int = 0) -> dict:
        """Random inputs for one component call at the manifest's opt shapes (or ``point``).

        For micro-benchmarks: ``pipe.components["unet"](**pipe.sample_inputs("unet"))``.
        """
        entry = self.manifest["components"][name]
        point = {**{a: v["opt"] for a, v in entry["axes"].items()}, **(point or {})}
        gen = torch.Generator().manual_seed(seed)
        feeds = {}
        for spec in entry["inputs"]:
            shape = tuple(resolve_dim(d, point) for d in spec["shape"])
            if spec["name"] == "timestep":
                tensor = torch.full(shape, 500.0)
            elif spec["dtype"].startswith("int"):
                tensor = torch.randint(0, self.facts["vocab_size"], shape, generator=gen)
            else:
                tensor = torch.randn(shape, generator=gen)
            feeds[spec["name"]] = tensor.to(self.device, TORCH_DTYPES[spec["dtype"]])
        return feeds

    # ---------------------------------------------------------------- the loop
    def _ids(self, tokenizer, texts: list[str]) -> torch.Tensor:
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        return ids.to(self.device, torch.int32)

    def encode_prompt(self, prompts: list[str], guidance: bool, height: int = 0, width: int = 0) -> dict:
        """The UNet's text conditioning inputs, ``[uncond; cond]`` (2B rows) under guidance, as
        diffusers orders them: ``encoder_hidden_states``; for SDXL also ``text_embeds`` (pooled)
        and ``time_ids`` (image ``height`` x ``width``, no crop), as ``StableDiffusionXLPipeline``
        makes them (penultimate hidden states of both encoders concatenated; a zero negative
        embedding when ``force_zeros_for_empty_prompt``)."""
        if self.family != "sdxl":
            texts = ([""] * len(prompts) + prompts) if guidance else prompts
            hidden = self.run_component("text_encoder", input_ids=self._ids(self.tokenizer, texts))
            return {"encoder_hidden_states": hidden}
        zeros = guidance and self.facts.get("force_zeros_for_empty_prompt", True)
        texts = ([""] * len(prompts) + prompts) if guidance and not zeros else prompts
        hidden_1 = self.run_component("text_encoder", input_ids=self._ids(self.tokenizer, texts))
        hidden_2, pooled = self.run_component("text_encoder_2", input_ids=self._ids(self.tokenizer_2, texts))
        hidden = torch.cat([hidden_1, hidden_2], dim=-1)
        if zeros:  # uncond rows are zeros, not the encoding of ""
            hidden = torch.cat([torch.zeros_like(hidden), hidden])
            pooled = torch.cat([torch.zeros_like(pooled), pooled])
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=hidden.dtype,
                                device=hidden.device)
        return {"encoder_hidden_states": hidden, "text_embeds": pooled,
                "time_ids": time_ids.repeat(hidden.shape[0], 1)}

    def _extra_step_kwargs(self, scheduler, generator, eta: float) -> dict:
        params = set(inspect.signature(scheduler.step).parameters)
        return {k: v for k, v in (("eta", eta), ("generator", generator)) if k in params}

    def latent_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """Latent (h, w) for image ``height`` x ``width`` (default: the model's own size)."""
        f, size = self.facts["vae_scale_factor"], self.facts["sample_size"]
        step = f * self.facts.get("unet_factor", 1)
        height, width = height or size * f, width or size * f
        for what, value in (("height", height), ("width", width)):
            if value % step:
                raise SdwbError(f"{what} {value}: expected a multiple of {step} for this model")
        return height // f, width // f

    def set_progress_bar_config(self, **_kw) -> None:
        """diffusers' pipelines have it; this loop draws no bar of its own (the caller's bar advances
        through ``callback_on_step_end``)."""

    def _edit_start(self, image: torch.Tensor, strength: float, noise: torch.Tensor, scheduler):
        """img2img's start (diffusers' ``StableDiffusionImg2ImgPipeline`` semantics): the image's latents
        and the timesteps left after ``strength`` skips the first ``steps * (1 - strength)``.

        ``strength`` 1 starts from the noise alone, exactly as text-to-image does (diffusers' inpaint
        pipeline does the same at full strength); 0 leaves no step, so the image comes back through
        the VAE unchanged (its reconstruction)."""
        if "vae_encoder" not in self.components:
            raise SdwbError("editing needs the VAE encoder: export with --components "
                            "text_encoder,unet,vae_decoder,vae_encoder (a tiny-decoder variant has none)")
        init = self.run_component("vae_encoder", image=image.to(self.device, torch.float32)).float()
        steps = len(scheduler.timesteps) // scheduler.order
        kept = min(int(steps * strength), steps)
        start = (steps - kept) * scheduler.order
        timesteps = scheduler.timesteps[start:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        if kept == steps:
            return init, timesteps, noise * scheduler.init_noise_sigma
        if not len(timesteps):
            return init, timesteps, init
        return init, timesteps, scheduler.add_noise(init, noise, timesteps[:1])

    def _latent_mask(self, mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """A ``[B, 1, H, W]`` mask in [0, 1] (1 = repaint) binarised at 0.5 and brought to the latent
        grid with nearest-neighbour sampling, as diffusers' inpaint pipeline does."""
        binary = (mask.float() >= 0.5).float()
        return torch.nn.functional.interpolate(binary, size=(h, w)).to(self.device)

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | list[str],
        *,
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE,
        generator: torch.Generator | list[torch.Generator] | None = None,
        height: int | None = None,
        width: int | None = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        image: torch.Tensor | None = None,
        strength: float = 1.0,
        mask_image: torch.Tensor | None = None,
    ):
        """diffusers' ``StableDiffusionPipeline.__call__`` contract: ``.images`` are PIL images
        (``output_type="pil"``) or float32 ``[B, H, W, 3]`` in [0, 1] (``"np"``), or the final latents
        (``"latent"``); the scheduler is ``self.scheduler`` (swap it as on a diffusers pipeline);
        ``callback_on_step_end(pipe, i, t, kwargs)`` is called after every step and returns ``kwargs``.

        Editing, as diffusers' img2img / inpaint pipelines take it: ``image`` ``[B, 3, H, W]`` in
        [-1, 1] starts the denoising part-way (``strength``, :meth:`_edit_start`); with ``mask_image``
        ``[B, 1, H, W]`` (1 = repaint) the latents outside the mask are reset after every step to the
        image's, noised to the next step's level (the last step: the image's own latents), which is
        how diffusers inpaints with a 4-channel UNet."""
        from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
        from diffusers.utils.torch_utils import randn_tensor

        if output_type not in ("pil", "np", "latent"):
            raise SdwbError(f"output_type {output_type!r}: expected 'pil', 'np' or 'latent'")
        if mask_image is not None and image is None:
            raise SdwbError("mask_image needs image (inpainting edits an image)")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        scheduler = self.scheduler
        cfg = guidance_scale > 1.0
        if image is not None:
            height, width = int(image.shape[-2]), int(image.shape[-1])
        h, w = self.latent_size(height, width)
        f = self.facts["vae_scale_factor"]
        conditions = self.encode_prompt(prompts, cfg, h * f, w * f)
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        shape = (len(prompts), self.facts["latent_channels"], h, w)
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        timesteps, init, mask = scheduler.timesteps, None, None
        if image is None:
            latents = noise * scheduler.init_noise_sigma
        else:
            init, timesteps, latents = self._edit_start(image, strength, noise, scheduler)
            if mask_image is not None:
                mask = self._latent_mask(mask_image, h, w)
        extra = self._extra_step_kwargs(scheduler, generator, eta)
        for i, t in enumerate(timesteps):
            model_input = torch.cat([latents] * 2) if cfg else latents
            model_input = scheduler.scale_model_input(model_input, t)
            timestep = t.reshape(1).to(self.device, torch.float32)
            noise_pred = self.run_component("unet", sample=model_input, timestep=timestep,
                                            **conditions).to(latents.dtype)
            if cfg:
                uncond, cond = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (cond - uncond)
            latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
            if mask is not None:
                last = i == len(timesteps) - 1
                proper = init if last else scheduler.add_noise(init, noise, timesteps[i + 1 : i + 2])
                latents = (1 - mask) * proper + mask * latents
            if callback_on_step_end is not None:
                latents = callback_on_step_end(self, i, t, {"latents": latents}).get("latents", latents)
        if mask is not None and not len(timesteps):
            latents = init
        if output_type == "latent":
            images = latents
        else:
            decoded = self.run_component("vae_decoder", latent=latents).float()
            images = (decoded / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                from PIL import Image

                images = [Image.fromarray((x * 255).round().clip(0, 255).astype(np.uint8)) for x in images]
        if not return_dict:
            return (images, None)
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None)

    def describe(self) -> str:
        """How the NaN guard of :func:`sdwb.generate.generate` names this pipeline."""
        return str(self.info.get("backend", "export"))


def load_tokenizers_and_scheduler(directory: Path):
    """``(tokenizer, tokenizer_2 or None, scheduler)`` saved beside an export (SDXL has two tokenizers)."""
    import diffusers
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer", local_files_only=True)
        tokenizer_2 = None
        if (directory / "tokenizer_2").is_dir():
            tokenizer_2 = AutoTokenizer.from_pretrained(directory / "tokenizer_2", local_files_only=True)
        config = diffusers.DDIMScheduler.load_config(directory / "scheduler")
        scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    except Exception as exc:
        raise SdwbError(
            f"could not load tokenizer/scheduler from {directory}: {type(exc).__name__}: {exc}"
        ) from None
    return tokenizer, tokenizer_2, scheduler


def resolve_providers(providers: Sequence[str | tuple] | None) -> list:
    """Provider names (aliases cpu/cuda/tensorrt allowed); default CUDA then CPU when available."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if providers is None:
        gpu = "CUDAExecutionProvider" in available and torch.cuda.is_available()
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else ["CPUExecutionProvider"]
    out = []
    for p in providers:
        name = p[0] if isinstance(p, tuple) else PROVIDER_ALIASES.get(str(p).lower(), str(p))
        if name not in available:
            raise SdwbError(
                f"provider {name}: not available in this onnxruntime (available: {', '.join(available)})"
            )
        out.append((name, p[1]) if isinstance(p, tuple) else name)
    return out


def _trt_provider_options(entry: dict, cache: Path) -> dict:
    """TensorRT EP options: engine + timing cache, and the manifest's min/opt/max as profile."""
    shapes = {w: ",".join(f"{n}:{'x'.join(map(str, p[w]))}" for n, p in entry["profile"].items())
              for w in ("min", "opt", "max")}
    return {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache),
            "trt_profile_min_shapes": shapes["min"], "trt_profile_opt_shapes": shapes["opt"],
            "trt_profile_max_shapes": shapes["max"]}


class OrtStableDiffusionPipeline(ExportedPipeline):
    """An ONNX export (``export/onnx.py``) run by ONNX Runtime sessions."""

    @classmethod
    def from_export(cls, directory: str | Path, providers: Sequence[str] | None = None,
                    threads: int | None = None, inter_threads: int | None = None,
                    trt_cache: str | Path | None = None, verify: bool = True, spinning: bool = False):
        """Verify the manifest's hashes, then open one session per component.

        ``threads``: intra-op threads per session (None: ONNX Runtime's default, one per core);
        ``inter_threads``: inter-op threads (only used by parallel execution mode).
        ``spinning``: let idle intra-op threads busy-wait for work (ONNX Runtime's default). Off
        here: a pipeline alternates three sessions (text encoder, UNet, VAE), each with its own
        thread pool, and the pool that just finished keeps spinning on the cores the next one
        needs. On 2 cores that made the 4-step tiny-shapes student 2.3x slower end to end
        (78 vs 33 ms per image, 2 threads; reports/fastest-cpu).
        """
        import onnxruntime as ort

        directory = Path(directory)
        manifest = verify_manifest(directory) if verify else read_manifest(directory)
        names = resolve_providers(providers)
        first = names[0][0] if isinstance(names[0], tuple) else names[0]
        device = "cuda" if first in GPU_PROVIDERS else "cpu"
        tokenizer, tokenizer_2, scheduler = load_tokenizers_and_scheduler(directory)
        components = {}
        for name, entry in manifest["components"].items():
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if not spinning:
                so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            if threads:
                so.intra_op_num_threads = int(threads)
            if inter_threads:
                so.inter_op_num_threads = int(inter_threads)
            provs = []
            for p in names:
                if p == "TensorrtExecutionProvider":
                    cache = Path(trt_cache or Path.home() / ".cache" / "sdwb" / "ort-trt") / name
                    cache.mkdir(parents=True, exist_ok=True)
                    p = (p, _trt_provider_options(entry, cache))
                provs.append(p)
            try:
                session = ort.InferenceSession(str(directory / entry["file"]), so, providers=provs)
            except Exception as exc:
                raise SdwbError(f"ONNX Runtime could not open {directory / entry['file']}: "
                                f"{type(exc).__name__}: {exc}") from None
            components[name] = OrtComponent(name, session, entry, device)
        info = {"backend": "onnxruntime", "providers": [p if isinstance(p, str) else p[0] for p in names],
                "intra_op_num_threads": threads or 0, "inter_op_num_threads": inter_threads or 0,
                "intra_op_spinning": spinning,
                "export": str(directory), "source": manifest.get("source", {})}
        pipe = cls(components, tokenizer, scheduler, manifest["pipeline"], device, info, tokenizer_2)
        pipe.manifest = manifest
        return pipe
