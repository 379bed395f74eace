"""``sdwb compress quantize`` / ``prune`` / ``distill`` (a typer sub-app): a model + method in, a variant out.

Why a sub-app: one module per verb group of the application layer; ``sdwb/app/cli.py`` mounts it with
``app.add_typer(compress_app, name="compress")``. Errors are :class:`SdwbError` and reach the
root CLI's one-line ``error:`` handler unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sdwb.errors import SdwbError
from sdwb.quant.config import methods_help

compress_app = typer.Typer(
    rich_markup_mode=None,
    help="Compress a model into a variant: quantize, prune, distill, decoder, cache.",
    no_args_is_help=True,
)

# Options the three commands share, declared once.
OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="Variant directory to create.")]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace OUTPUT if it exists (only on success).")]
ProgressOpt = Annotated[bool, typer.Option(help="Show progress bars.")]
WorkDirOpt = Annotated[
    Optional[Path], typer.Option(help="Resumable state (default OUTPUT.work; removed on success).")
]
KeepWorkOpt = Annotated[bool, typer.Option(help="Keep the work directory after success.")]


def _set_option(example: str):
    """The repeatable ``--set KEY=VALUE`` config override, with a command-specific example."""
    return Annotated[
        Optional[list[str]],
        typer.Option("--set", "-s", metavar="KEY=VALUE", help=f"Override a config key, e.g. {example}."),
    ]


def _components(text: Optional[str]) -> Optional[list[str]]:
    if text is None:
        return None
    from sdwb.quant.config import COMPONENTS

    names = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in names if c not in COMPONENTS]
    if bad or not names:
        raise SdwbError(
            f"--components {text!r}: expected a comma-separated subset of {', '.join(COMPONENTS)}"
        )
    return names


def _check_output(output: Path, overwrite: bool) -> None:
    """The variant directory can be written, checked before the model loads or anything trains."""
    from sdwb.runs import check_writable_dir

    if output.exists() and not overwrite:
        raise SdwbError(f"{output}: already exists (refusing to overwrite a finished variant; --overwrite)")
    check_writable_dir(output, f"--output {output}")


def _say(progress: bool):
    """A verb's status lines (dim, on stderr) when progress is on, else None."""
    if not progress:
        return None
    from rich.console import Console

    console = Console(stderr=True)
    return lambda m: console.print(f"[dim]{m}[/]")


def _quiet_libraries(method: str) -> None:
    """No tqdm bars from diffusers/transformers saving and loading; optional libraries imported quietly."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    from sdwb.quant.registry import REQUIREMENTS

    needs = REQUIREMENTS.get(method)
    if needs is not None:
        try:
            needs()  # import an optional library (torchao) now, quietly
        except SdwbError:
            pass  # quantize() reports it, after the clearer device checks


@compress_app.command("quantize", short_help="Quantize a model with one method, guarded against float.")
def quantize_command(
    output: OutputOpt,
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="builtin:NAME, a diffusers dir, an ONNX export (ort-* methods) or a cached hub id.",
        ),
    ] = "builtin:tiny-shapes",
    method: Annotated[Optional[str], typer.Option(help=f"{methods_help()}.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="configs/quantize/*.yaml.")] = None,
    components: Annotated[
        Optional[str], typer.Option(help="Comma list of unet,text_encoder,vae_decoder (default: unet).")
    ] = None,
    calib_prompts: Annotated[
        Optional[int], typer.Option(help="Calibration prompts (*-int8-static, ov-int8-hybrid).")
    ] = None,
    min_psnr: Annotated[Optional[float], typer.Option(help="Guard floor, dB vs the float model.")] = None,
    set_: _set_option("guard.steps=4") = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Quantize a model with one method; probe it against the float model; write the variant + sdwb.json.

    torch methods write a diffusers directory (loads with `sdwb generate --model DIR`, benches with
    `sdwb bench`); ort-* methods write an ONNX export (`--backend onnxruntime`), ov-* methods an
    OpenVINO IR export (`--backend openvino`).
    """
    from compress.quantize import quantize
    from export.onnx import export_onnx
    from sdwb.quant.config import METHODS, backend_of, load_quant_config

    if method is None and config is None:
        raise SdwbError("give --method METHOD or --config FILE (configs/quantize/*.yaml)")
    flags = {"method": method, "components": _components(components), "guard.min_psnr": min_psnr}
    cfg = load_quant_config(config, set_, **flags)
    if calib_prompts is not None:
        if "calibration" not in type(cfg).model_fields:
            raise SdwbError(f"--calib-prompts: {cfg.method} does not calibrate (the calibrated methods: "
                            f"{', '.join(m for m, c in METHODS.items() if 'calibration' in c.model_fields)})")
        cfg = load_quant_config(config, set_, **flags, **{"calibration.prompts": calib_prompts})
    _check_output(output, overwrite)
    _quiet_libraries(cfg.method)
    from sdwb.progress import status

    with status(f"quantizing {model} ({cfg.method})") as update:
        variant = quantize(model, cfg, output, overwrite=overwrite, progress=update, exporter=export_onnx)
    m = variant.metrics
    guard = m.get("guard")
    guard_text = (
        f"guard PSNR {guard['psnr']:.1f} dB >= {guard['min_psnr']:g}"
        if isinstance(guard, dict)
        else "guard disabled"
    )
    size = f", {m['size_mb']:.1f} MB" if "size_mb" in m else ""
    typer.echo(f"wrote {output} ({cfg.method}, {backend_of(cfg)}{size}; {guard_text}) and {output}/sdwb.json")


@compress_app.command("distill", short_help="Step-distil a model (progressive or LCM), resumable.")
def distill_command(
    output: OutputOpt,
    model: Annotated[
        str, typer.Option("--model", "-m", help="Teacher: builtin:NAME, a diffusers dir or a cached hub id.")
    ] = "builtin:tiny-shapes",
    method: Annotated[
        Optional[str],
        typer.Option(help="progressive (rounds of N -> N/2 steps) | lcm (latent consistency, one run)."),
    ] = None,
    teacher_steps: Annotated[Optional[int], typer.Option(help="Teacher DDIM steps (default 64).")] = None,
    student_steps: Annotated[
        Optional[int], typer.Option(help="Student DDIM steps; teacher/student a power of two (default 4).")
    ] = None,
    guidance_distill: Annotated[
        Optional[bool],
        typer.Option("--guidance-distill/--no-guidance-distill",
                     help="Distil classifier-free guidance into the student (then one UNet call per step)."),
    ] = None,
    guidance: Annotated[
        Optional[float], typer.Option(help="CFG scale distilled in, or the student's default (7.5).")
    ] = None,
    budget: Annotated[
        Optional[str], typer.Option(help="Per round: optimizer steps (200) or time (10m, 90s, 1h).")
    ] = None,
    batch: Annotated[Optional[int], typer.Option(help="Training batch (default 32).")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="configs/distill/*.yaml.")] = None,
    set_: _set_option("lr=0.0002") = None,
    work_dir: WorkDirOpt = None,
    keep_work: KeepWorkOpt = False,
    overwrite: OverwriteOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Step-distil a model: progressive distillation (N -> N/2 per round), optionally guidance-distilled,
    or latent consistency distillation (--method lcm: guidance distilled in, sampled with LCMScheduler).

    Resumable: re-run the same command after an interruption and it continues from the last
    checkpoint. The student is a diffusers directory + sdwb.json whose inference defaults (steps,
    ddim, guidance) `sdwb generate` and `sdwb bench` use when not told otherwise.
    """
    from compress.distill import distill
    from compress.distill_config import load_distill_config

    flags = {"method": method, "teacher_steps": teacher_steps, "student_steps": student_steps,
             "guidance_distill": guidance_distill, "guidance": guidance, "budget": budget, "batch": batch}
    cfg = load_distill_config(config, set_, **flags)
    _check_output(output, overwrite)
    _quiet_libraries(cfg.method)
    result = distill(model, cfg, output, work_dir=work_dir, overwrite=overwrite, keep_work=keep_work,
                     progress=progress, say=_say(progress))
    inf = result.record["inference"]
    losses = ", ".join(f"{r['teacher_steps']}->{r['student_steps']}: loss {r['loss_first']:.4g}->"
                       f"{r['loss_last']:.4g}" for r in result.rounds if r.get("loss_last") is not None)
    typer.echo(f"wrote {output} ({cfg.method} {cfg.teacher_steps} -> {cfg.student_steps} steps"
               f"{', guidance distilled at %g' % cfg.guidance if cfg.guidance_distill else ''}; {losses}) "
               f"and {output}/sdwb.json; it generates with {inf['steps']} {inf['scheduler']} steps, "
               f"guidance {inf['guidance']:g} by default")


@compress_app.command("decoder", short_help="Distil a tiny VAE decoder (TAESD-style), resumable.")
def decoder_command(
    output: OutputOpt,
    model: Annotated[
        str, typer.Option("--model", "-m", help="builtin:NAME, a diffusers dir or a cached hub id.")
    ] = "builtin:tiny-shapes",
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps (default 1000).")] = None,
    channels: Annotated[
        Optional[int], typer.Option(help="Width of every decoder level (default 32).")
    ] = None,
    config: Annotated[
        Optional[Path], typer.Option("--config", "-c", help="configs/decoder/vae-decoder.yaml.")
    ] = None,
    set_: _set_option("generated=512") = None,
    work_dir: WorkDirOpt = None,
    keep_work: KeepWorkOpt = False,
    overwrite: OverwriteOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Replace the model's VAE by a tiny decoder (diffusers AutoencoderTiny) trained to reproduce
    the full decoder's images, from latents of encoded shapes images and of the model's own sampler.

    The variant loads with plain diffusers and `sdwb generate` / `sdwb bench` / `sdwb export onnx`;
    sdwb.json holds PSNR/SSIM against the full decoder on held-out latents and both decoders'
    time per image. Its VAE cannot encode (the encoder is not trained). Resumable: re-run the same
    command after an interruption.
    """
    from compress.tiny_decoder import distill_decoder, load_decoder_config

    cfg = load_decoder_config(config, set_, steps=steps, channels=channels)
    _check_output(output, overwrite)
    _quiet_libraries("decoder")
    result = distill_decoder(model, cfg, output, work_dir=work_dir, overwrite=overwrite, keep_work=keep_work,
                             progress=progress, say=_say(progress))
    m = result.metrics
    fid = ", ".join(f"{kind} {v['psnr']:.1f} dB / SSIM {v['ssim']:.3f}" for kind, v in m["fidelity"].items())
    times = m["decode_ms_per_image"]
    timing = "" if not times else (
        f"; decode {times['full']['batch_1']:.2f} -> {times['tiny']['batch_1']:.2f} ms per image at batch 1, "
        f"{times['full']['batch_8']:.2f} -> {times['tiny']['batch_8']:.2f} at batch 8")
    params = m["decoder_params"]
    typer.echo(f"wrote {output} (tiny decoder {params['tiny'] / 1e3:.0f} k params vs "
               f"{params['full'] / 1e3:.0f} k; "
               f"vs the full decoder on held-out latents: {fid}{timing}) and {output}/sdwb.json; "
               "its VAE cannot encode (no img2img, no vae_encoder export)")


def _names(text: Optional[str]) -> Optional[list[str]]:
    return None if text is None else [n.strip() for n in text.split(",") if n.strip()]


@compress_app.command("prune", short_help="Prune the UNet (channels or blocks), optionally recover.")
def prune_command(
    output: OutputOpt,
    model: Annotated[
        str, typer.Option("--model", "-m", help="builtin:NAME, a diffusers dir or a cached hub id.")
    ] = "builtin:tiny-shapes",
    ratio: Annotated[
        Optional[float], typer.Option(help="channels: fraction of channels and heads removed, in (0, 1).")
    ] = None,
    importance: Annotated[Optional[str], typer.Option(help="channels: magnitude | taylor.")] = None,
    method: Annotated[
        Optional[str], typer.Option(help="channels (torch-pruning groups + heads) | blocks (BK-SDM style).")
    ] = None,
    finetune_steps: Annotated[
        Optional[int], typer.Option(help="Recovery steps of distillation from the unpruned UNet (0).")
    ] = None,
    ignored_layers: Annotated[
        Optional[str], typer.Option(help="channels: comma list of module names/globs kept at full width.")
    ] = None,
    blocks: Annotated[
        Optional[str], typer.Option(help="blocks: comma list of blocks to remove (names/globs).")
    ] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="configs/prune/*.yaml.")] = None,
    set_: _set_option("finetune.lr=1e-4") = None,
    work_dir: WorkDirOpt = None,
    keep_work: KeepWorkOpt = False,
    overwrite: OverwriteOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Prune the UNet (channels or blocks), optionally recover by distillation; write the variant + sdwb.json.

    The variant is a diffusers directory whose sdwb.json records the pruned architecture; it loads
    with `sdwb generate --model DIR`, `sdwb bench` and `sdwb export onnx --model DIR`. Recovery is
    resumable: re-run the same command after an interruption.
    """
    from compress.prune import prune
    from compress.prune_config import load_prune_config

    flags = {"method": method, "ratio": ratio, "importance": importance, "finetune.steps": finetune_steps,
             "ignored_layers": _names(ignored_layers), "blocks": _names(blocks)}
    cfg = load_prune_config(config, set_, **flags)
    _check_output(output, overwrite)
    _quiet_libraries("prune")
    result = prune(model, cfg, output, work_dir=work_dir, keep_work=keep_work, overwrite=overwrite,
                   progress=progress, say=_say(progress))
    m = result.metrics
    macs, params = m["unet_gmacs"], m["unet_params_m"]
    what = f"ratio {cfg.ratio:g}, {cfg.importance}" if cfg.method == "channels" else \
        f"{len(m['pruned']['removed'])} blocks removed"
    recovery = m.get("recovery")
    recovered = "" if not recovery else (
        f"; recovery {recovery['steps']} steps: distillation MSE {recovery['distill_mse_before']:.4g} -> "
        f"{recovery['distill_mse_after']:.4g}")
    typer.echo(f"wrote {output} ({cfg.method}: {what}; UNet {macs['before']:.4g} -> {macs['after']:.4g} "
               f"GMACs (-{macs['reduction']:.0%}), {params['before']:.3g} -> {params['after']:.3g} M params"
               f"{recovered}) and {output}/sdwb.json")


@compress_app.command("cache", short_help="Training-free acceleration: DeepCache or ToMe, applied on load.")
def cache_command(
    output: OutputOpt,
    model: Annotated[
        str, typer.Option("--model", "-m", help="builtin:NAME, a diffusers dir / torch variant, a hub id.")
    ] = "builtin:tiny-shapes",
    method: Annotated[
        Optional[str], typer.Option(help="deepcache (reuse the deep UNet features) | tomesd (token merging).")
    ] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="configs/cache/*.yaml.")] = None,
    set_: _set_option("interval=3") = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Make a variant that runs a training-free acceleration: the source's weights + sdwb.json
    recording the method, re-applied whenever the variant loads (`sdwb generate --model DIR`,
    `sdwb bench`, recipes). Torch backend only.

    deepcache: the full UNet every `interval`-th step, the deep features reused in between
    (`branch`: which skip branch is recomputed, 0 the shallowest). tomesd: `ratio` of the image
    tokens merged before self-attention in blocks at most `max_downsample` below the latent
    resolution (`sx`, `sy`, `use_rand` + `seed`).
    """
    from compress.cache import make_cache_variant
    from sdwb.cache.config import load_cache_config

    if method is None and config is None:
        raise SdwbError("give --method deepcache|tomesd or --config FILE (configs/cache/*.yaml)")
    cfg = load_cache_config(config, set_, method=method)
    _check_output(output, overwrite)
    _quiet_libraries("cache")
    from sdwb.progress import status

    with status(f"caching {model} ({cfg.method})") as update:
        variant = make_cache_variant(model, cfg, output, overwrite=overwrite, say=update)
    knobs = ", ".join(f"{k} {v}" for k, v in variant.record["config"].items() if k != "method")
    typer.echo(f"wrote {output} ({cfg.method}: {knobs}) and {output}/sdwb.json; applied whenever it loads")
