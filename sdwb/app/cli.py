"""The ``sdwb`` command line (typer + rich).

Why one entry point with one error policy: every command either does its job or prints exactly
one line ``error: <what was wrong with which input>`` on stderr and exits non-zero; an unexpected
exception becomes ``error: internal: <Type>: <message>`` (``SDWB_DEBUG=1`` shows the traceback).
Heavy libraries (torch, diffusers) are imported inside the commands so ``sdwb --help`` is fast.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

try:  # typer >= 0.20 carries its own copy of click; its usage errors are that copy's classes
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer on the real click
    from click import exceptions as click_exceptions

from sdwb import __version__
from sdwb.backends.registry import BACKENDS
from sdwb.errors import SdwbError
from sdwb.threads import apply_default as apply_default_threads
from sdwb.threads import start_window

app = typer.Typer(
    rich_markup_mode=None,
    name="sdwb",
    help="sd-workbench: make Stable Diffusion cheaper to run and prove it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
data_app = typer.Typer(rich_markup_mode=None, help="The procedural shapes data set.", no_args_is_help=True)
config_app = typer.Typer(rich_markup_mode=None, help="Recipes: validate and resolve YAML files in configs/.",
                         no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")

try:  # `sdwb baseline train` lives with the training code; the CLI works without it
    from sdwb.train.cli import baseline_app
except ModuleNotFoundError as _exc:
    if _exc.name not in ("sdwb.train", "sdwb.train.cli"):
        raise
else:
    app.add_typer(baseline_app, name="baseline")

from sdwb.app.bench_cli import bench_command  # noqa: E402
from sdwb.app.cli_output import console as _console  # noqa: E402
from sdwb.app.cli_output import resolve_device as _resolve_device  # noqa: E402
from sdwb.app.cli_output import write_images  # noqa: E402  (imports only typer; heavy imports are lazy)
from sdwb.app.compress_cli import compress_app  # noqa: E402
from sdwb.app.edit_cli import edit_command  # noqa: E402
from sdwb.app.export_cli import export_app  # noqa: E402
from sdwb.app.gate_cli import gate_command  # noqa: E402
from sdwb.app.lora_cli import lora_app  # noqa: E402
from sdwb.app.report_cli import report_command  # noqa: E402

app.add_typer(compress_app, name="compress")
app.add_typer(lora_app, name="lora", short_help="LoRA adapters: train one, fuse one into a model.")
app.add_typer(export_app, name="export",
              short_help="Export to ONNX or OpenVINO IR, or build TensorRT engines.")
# short_help: the one line `sdwb --help` lists (click would cut the first sentence mid-way at 80 columns)
app.command("edit", short_help="Edit an image under a prompt: img2img, inpainting with --mask.")(edit_command)
app.command("bench", short_help="Benchmark variants side by side: latency, memory, quality.")(bench_command)
app.command("report", short_help="Render bench results into report.md and report.html.")(report_command)
app.command("gate", short_help="Decide whether a candidate regressed against a baseline.")(gate_command)


def _wrap_help_at_spaces() -> None:
    """Help text wraps at spaces only, never inside a hyphenated word.

    click wraps help with textwrap's default ``break_on_hyphens=True``, which split method names
    and defaults at 80 columns (``ov-`` / ``int8-hybrid``, ``[default: no-`` / ``overwrite]``): names
    a user copies. Its ``wrap_text`` builds a ``TextWrapper`` from its ``_textwrap`` module on each
    call, so a subclass there changes only the default. Help text only; no-op if that changes.
    """
    try:
        from typer._click import _textwrap
    except ImportError:  # pragma: no cover - older typer on the real click
        try:
            from click import _textwrap
        except ImportError:
            return
    base = _textwrap.TextWrapper
    if getattr(base, "sdwb_no_hyphen_breaks", False):
        return

    class TextWrapper(base):
        sdwb_no_hyphen_breaks = True

        def __init__(self, *args, **kwargs):
            kwargs.setdefault("break_on_hyphens", False)
            super().__init__(*args, **kwargs)

    _textwrap.TextWrapper = TextWrapper


_wrap_help_at_spaces()

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", metavar="KEY=VALUE", help="Override a recipe key, e.g. generate.steps=4 "
                 "(repeat for several)."),
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sdwb {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
    follow_symlinks: Annotated[
        bool,
        typer.Option("--follow-symlinks", help="Load models whose directory holds symlinks leading out of it "
                     "(refused otherwise; same as SDWB_FOLLOW_SYMLINKS=1). Give it before the command."),
    ] = False,
) -> None:
    """sd-workbench: make Stable Diffusion cheaper to run and prove it."""
    apply_default_threads()  # before any library that reads its thread count loads
    if follow_symlinks:  # the environment, so worker processes (memory probe, gate) inherit it
        from sdwb.verify import FOLLOW_SYMLINKS_ENV

        os.environ[FOLLOW_SYMLINKS_ENV] = "1"


# --------------------------------------------------------------------------- models


@app.command(short_help="List the builtin models and the families and verbs supported.")
def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """List the builtin models (what each is for, whether quality metrics apply, whether present)
    and the Stable Diffusion families, with the verbs each supports."""
    from sdwb.families import FAMILIES, VERBS, support_table, supported_text
    from sdwb.zoo import list_models

    rows = [
        {
            "name": m.name,
            "family": FAMILIES[m.family].label if m.kind in ("pipeline", "lora") else None,
            "kind": m.kind,
            "description": m.description,
            "quality_metrics": bool(m.quality_metrics),
            "available": bool(m.available()),
            "location": m.location,
        }
        for m in list_models()
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    import textwrap

    from rich.table import Table
    from rich.text import Text

    # One block per model, the long text on its own lines (wrapped at spaces, indented): readable
    # at 80 columns, where a table's narrow description column broke words in the middle.
    console = _console()

    def indented(text: str) -> str:
        return textwrap.fill(text, width=max(40, console.width - 1), initial_indent="    ",
                             subsequent_indent="    ", break_on_hyphens=False)

    console.print(Text("builtin models", style="bold"))
    for r in rows:
        head = Text.assemble(
            "\n", (r["name"], "bold"), "  ",
            ("available", "green") if r["available"] else ("missing", "red"),
            f", quality metrics {'yes' if r['quality_metrics'] else 'no'}",
            f", {r['family']}" if r["family"] else "",
        )
        console.print(head)
        for text, style in ((r["description"], ""), (f"location: {r['location']}", "dim")):
            console.print(Text(indented(text), style=style), soft_wrap=True)
    console.print()
    families = Table(title="Stable Diffusion families: verbs supported", show_lines=False)
    families.add_column("verb", no_wrap=True, style="bold")
    table_rows = support_table()
    for row in table_rows:
        families.add_column(row["family"], justify="center")
    for verb in VERBS:
        families.add_row(verb, *("yes" if row[verb] else "-" for row in table_rows))
    console.print(families)
    console.print(
        f"Also accepted as --model: a local diffusers pipeline directory of one of these families "
        f"({supported_text()}; any other pipeline class is refused), or a hub id already in the local "
        "Hugging Face cache (nothing is downloaded)."
    )


# --------------------------------------------------------------------------- generate


GENERATE_HELP = (
    "Generate images from a model.\n\n"
    "One image is written to OUTPUT. With several (more than one --prompt, or --batch > 1) OUTPUT is a "
    "grid (one row per prompt, one column per image of that prompt) with each image's prompt and seed "
    "under it, and every image is also written beside it, uncaptioned, as STEM-NNN.SUFFIX. Image k "
    "(prompt-major order) is seeded with seed + k. "
    "STEM.json beside OUTPUT records the resolved recipe, the prompts, seeds and files.\n\n"
    "Precedence: flags, then --set, then the --config file, then the model's own inference defaults "
    "(steps, scheduler, guidance of a distilled variant's sdwb.json), then the defaults."
)


@app.command(help=GENERATE_HELP)
def generate(
    prompt: Annotated[
        list[str], typer.Option("--prompt", "-p", metavar="TEXT", help="Prompt (repeat for several).")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Image file to write (.png/.jpg).")],
    model: Annotated[
        Optional[str], typer.Option("--model", "-m", help="builtin:NAME, a directory, or a cached hub id.")
    ] = None,
    steps: Annotated[
        Optional[int], typer.Option(help="Denoising steps (default: the model's, else 30).")
    ] = None,
    guidance: Annotated[
        Optional[float], typer.Option(help="Guidance scale (default: the model's, else 7.5).")
    ] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of image 0; image k uses seed+k.")] = None,
    scheduler: Annotated[
        Optional[str], typer.Option(help="ddim | euler | dpmpp | lcm (default: the model's, else ddim).")
    ] = None,
    batch: Annotated[Optional[int], typer.Option(help="Images per prompt (default 1).")] = None,
    height: Annotated[Optional[int], typer.Option(help="Height in pixels (default: model's).")] = None,
    width: Annotated[Optional[int], typer.Option(help="Width in pixels (default: model's).")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="fp32 | bf16 | fp16 (default fp32).")] = None,
    compile_: Annotated[
        bool, typer.Option("--compile", help="torch backend: torch.compile the UNet (inductor, static "
                           "shapes); the first call compiles, tens of seconds on a CPU.")
    ] = False,
    compile_mode: Annotated[
        Optional[str], typer.Option(help="With --compile: default | reduce-overhead | max-autotune | "
                                    "max-autotune-no-cudagraphs (default: default).")
    ] = None,
    backend: Annotated[
        str,
        typer.Option(
            help=f"auto | {' | '.join(BACKENDS)} (all but torch: --model is an export dir; auto: "
            "onnxruntime for an ONNX export or ONNX Runtime variant, else torch)."
        ),
    ] = "auto",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N].")] = "auto",
    lora: Annotated[
        Optional[str], typer.Option(help="torch backend: a LoRA adapter (builtin:NAME, a dir or "
                                    ".safetensors) loaded unfused; projected onto a pruned model's widths.")
    ] = None,
    lora_scale: Annotated[
        float, typer.Option(min=0.0, max=4.0, help="LoRA strength (1.0: as trained).")
    ] = 1.0,
    config: Annotated[
        Optional[Path], typer.Option("--config", "-c", help="Recipe YAML; flags override it.")
    ] = None,
    set_: SetOption = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    overwrite: Annotated[
        bool, typer.Option(help="Replace a STEM.json beside OUTPUT that sdwb generate did not write.")
    ] = False,
) -> None:
    """Generate images (see GENERATE_HELP): recipe + flags -> pipeline -> image files + json."""
    from sdwb.app.recipe_schema import config_hash, load_recipe, recipe_from_dict, resolved_dict
    from sdwb.runs import atomic_write_json, check_writable_file

    if backend not in ("auto", *BACKENDS):
        raise SdwbError(f"--backend {backend}: expected auto, {', '.join(BACKENDS[:-1])} or {BACKENDS[-1]}")
    from sdwb.preflight import check_prompts, check_resolution, check_sidecar

    check_prompts(prompt)  # before anything is loaded: a bad byte is the user's, not an internal error
    recipe = load_recipe(config, set_)
    flags = {"model": model, "steps": steps, "guidance": guidance, "seed": seed, "scheduler": scheduler,
             "batch": batch, "height": height, "width": width, "dtype": dtype}
    data = resolved_dict(recipe)
    for key, value in flags.items():
        if value is not None:
            (data if key == "model" else data["generate"])[key] = value
    from sdwb.inference import for_spec

    given = recipe.generate.model_fields_set | {k for k, v in flags.items() if v is not None}
    for key, value in for_spec(data["model"]).items():  # a distilled model's own steps/sampler/guidance
        if key not in given:
            data["generate"][key] = value
    recipe = recipe_from_dict(data, "command line")
    g = recipe.generate
    if backend == "auto":  # what the model directory's manifest says it is
        from sdwb.backends.registry import backend_for

        backend = backend_for(recipe.model)
    if lora is not None:
        from sdwb.lora import check_backend

        check_backend(backend, "--lora")
    output = check_writable_file(output, IMAGE_SUFFIXES)
    check_sidecar(output.with_suffix(".json"), output, overwrite)
    device = _resolve_device(device)
    check_resolution(recipe.model, g.height, g.width, images=g.batch,
                     dtype_bytes=4 if g.dtype == "fp32" else 2, device=device)
    compiled = _compile_mode(compile_, compile_mode, backend, device)

    import torch

    _disable_library_progress_bars()
    started = time.perf_counter()
    prompts = [p for p in prompt for _ in range(g.batch)]
    kw = dict(steps=g.steps, guidance=g.guidance, seed=g.seed, scheduler=g.scheduler, batch=g.batch,
              height=g.height, width=g.width, progress=progress)
    if backend == "torch":
        from sdwb.generate import generate as run_generate
        from sdwb.loading import load_pipeline

        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[g.dtype]
        with _console().status(f"loading {recipe.model}", spinner="dots"):
            pipe = load_pipeline(recipe.model, device=device, dtype=torch_dtype, lora=lora,
                                 lora_scale=lora_scale)
        if compiled:
            from sdwb.torch_compile import compile_unet

            compile_unet(pipe, compiled)
        images = run_generate(pipe, prompts, **kw)
    else:
        images = _generate_exported(backend, recipe.model, g.dtype, device, prompts, kw)
    captions = [f"{p}\nseed {g.seed + k}" for k, p in enumerate(prompts)]
    files = write_images(images, output, captions, columns=g.batch if len(prompt) > 1 else len(images))
    record = {
        "command": "generate",
        "sdwb_version": __version__,
        "model": recipe.model,
        "backend": backend,
        "device": device,
        "compile": compiled,
        "lora": getattr(pipe, "sdwb_lora", None) if backend == "torch" else None,
        "output": str(output),
        "images": [{"prompt": p, "seed": g.seed + k, "file": f}
                   for k, (p, f) in enumerate(zip(prompts, files))],
        "seconds": round(time.perf_counter() - started, 3),
        "config_hash": config_hash(recipe),
        "config": resolved_dict(recipe),
    }
    meta = atomic_write_json(output.with_suffix(".json"), record)
    typer.echo(f"wrote {output} ({len(images)} image{'s' if len(images) > 1 else ''}) and {meta}")


def _compile_mode(compile_: bool, mode: str | None, backend: str, device: str) -> str | None:
    """The torch.compile mode ``generate`` runs with (None: eager), checked before anything loads:
    torch backend only, a known mode, and a compiler inductor can use (:mod:`sdwb.torch_compile`)."""
    if not compile_:
        if mode is not None:
            raise SdwbError(f"--compile-mode {mode}: needs --compile")
        return None
    if backend != "torch":
        raise SdwbError(f"--compile: torch.compile is a torch backend option, not one of --backend {backend} "
                        "(use --backend torch, or leave out --compile)")
    from sdwb.torch_compile import COMPILE_MODES, check_compile

    mode = mode or "default"
    if mode not in COMPILE_MODES:
        raise SdwbError(f"--compile-mode {mode}: expected one of {', '.join(COMPILE_MODES)}")
    check_compile(device)
    return mode


def _generate_exported(backend: str, model: str, dtype: str, device: str, prompts: list[str],
                       kw: dict) -> list:
    """``--backend onnxruntime|openvino|tensorrt``: ``model`` must be an export (engine) directory."""
    from sdwb.app.export_cli import generate_with_backend
    from sdwb.backends.registry import TABLE, check_model

    dtypes = TABLE[backend].dtypes if backend != "tensorrt" else ("fp32",)
    if dtype not in dtypes:
        raise SdwbError(f"--dtype {dtype}: --backend {backend} runs {' or '.join(dtypes)} (exports are fp32 "
                        "graphs; fp16 TensorRT engines come from `sdwb export tensorrt --fp16`)")
    check_model(backend, model)  # one-line error naming the export to run first
    return generate_with_backend(backend, model, prompts, device=device, exported_dtype=dtype, **kw)


# --------------------------------------------------------------------------- data


@data_app.command("preview", short_help="Write a captioned grid of data-set samples (+ .json).")
def data_preview(
    output: Annotated[Path, typer.Option("--output", "-o", help="Grid image to write (.png).")],
    count: Annotated[int, typer.Option("-n", "--count", help="Number of samples (1-256).")] = 16,
    seed: Annotated[int, typer.Option(help="Seed of the first sample (train stream).")] = 0,
    columns: Annotated[int, typer.Option(help="Grid columns.")] = 4,
) -> None:
    """Write a grid of shapes data-set samples with their captions (+ a .json of their attributes)."""
    from sdwb import shapes
    from sdwb.runs import atomic_save_image, atomic_write_json, check_writable_file

    if not 1 <= count <= 256:
        raise SdwbError(f"--count {count}: expected 1 to 256 samples")
    if seed < 0:
        raise SdwbError(f"--seed {seed}: expected a seed >= 0")
    if columns < 1:
        raise SdwbError(f"--columns {columns}: expected at least 1")
    output = check_writable_file(output, IMAGE_SUFFIXES)
    grid = shapes.preview_grid(count=count, seed=seed, columns=columns)
    atomic_save_image(grid, output)
    samples = [shapes.sample_from_seed(seed + i).to_dict() for i in range(count)]
    meta = atomic_write_json(output.with_suffix(".json"), {"command": "data preview", "samples": samples})
    typer.echo(f"wrote {output} ({count} samples) and {meta}")


# --------------------------------------------------------------------------- config


@config_app.command("check", short_help="Validate a recipe and print it resolved, as YAML.")
def config_check(
    file: Annotated[Path, typer.Argument(metavar="RECIPE", help="Recipe YAML file.")],
    set_: SetOption = None,
) -> None:
    """Validate a recipe and print it resolved (defaults filled in, --set applied) as YAML."""
    from sdwb.app.recipe_schema import config_hash, load_recipe, resolved_yaml

    recipe = load_recipe(file, set_)
    typer.echo(f"# {file}: valid; config hash {config_hash(recipe)}")
    typer.echo(resolved_yaml(recipe), nl=False)


# --------------------------------------------------------------------------- run


@app.command("run", short_help="Run a recipe's stages in order (prune ... bench, report).")
def run(
    recipe_file: Annotated[
        Path, typer.Argument(metavar="RECIPE", help="configs/recipes/*.yaml, or a recipe name.")
    ],
    set_: SetOption = None,
    store: Annotated[Path, typer.Option(help="Where stage artifacts live, by hash.")] = Path("runs/stages"),
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; run nothing.")] = False,
    until: Annotated[Optional[str], typer.Option(help="Stop after this stage (name or number).")] = None,
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Run record dir (default runs/<recipe>-<hash>).")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Run a recipe's stages in order (prune, distill, quantize, export, generate, bench, report).

    Each stage's artifact is addressed by the hash of its resolved config and inputs, under
    STORE/<kind>-<hash>/: a re-run skips finished stages, a killed run resumes (prune and distill
    from their checkpoints), and recipes that share stages share their artifacts. The run is
    recorded in runs/<recipe>-<hash>/run.json (or --out), with links `model` and `report` to the
    final artifacts.
    """
    from rich.console import Console

    from bench.results import python_command
    from sdwb.app.recipe_run import plan, recipe_path, run_recipe
    from sdwb.app.recipe_schema import load_recipe

    path = recipe_file if recipe_file.exists() else recipe_path(str(recipe_file))
    recipe = load_recipe(path, set_)
    console = Console(stderr=True)
    if dry_run:
        for p in plan(recipe, store):
            state = "cached" if p.done else "to run"
            typer.echo(f"{p.index + 1}. {p.kind:<8} {p.name:<12} {state:<7} {p.out}")
        return
    if not recipe.stages:
        raise SdwbError(f"{path}: the recipe has no stages to run")
    from sdwb.app.bench_cli import _quiet_library_progress

    _quiet_library_progress()
    result = run_recipe(recipe, store=store, out=out, progress=progress, command=python_command(),
                        until=until, say=lambda m: console.print(f"[dim]{m}[/]"))
    counts = {k: sum(1 for v in result.status.values() if v == k) for k in ("ran", "cached", "pending")}
    left = f", {counts['pending']} left for later" if counts["pending"] else ""
    typer.echo(f"recipe {recipe.name}: {counts['ran']} stage(s) ran, {counts['cached']} reused{left}; "
               f"record in {result.run_dir / 'run.json'}")
    from sdwb.app.recipe_schema import MODEL_STAGES

    final = [p for p in result.stages if p.kind in MODEL_STAGES]
    if final and final[-1].done:
        typer.echo(f"model: {final[-1].out}")
    report = result.report()
    if report is not None:
        typer.echo(f"report: {report} (and {report.with_suffix('.md')})")


# --------------------------------------------------------------------------- entry point


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _quiet_libraries() -> None:
    """Offline, and no library chatter on stderr: only our own output and ``error:`` lines.

    Environment variables already set by the user win (``TRANSFORMERS_VERBOSITY=info`` ...).
    """
    for key, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
                       ("DIFFUSERS_VERBOSITY", "error"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
        os.environ.setdefault(key, value)


def _disable_library_progress_bars() -> None:
    """diffusers/transformers draw tqdm bars while loading; ours (rich) replace them. Every
    ``sdwb.loading`` load turns them off too; this covers the exported backends' loads as well."""
    from sdwb.loading import quiet_library_progress

    quiet_library_progress()


_ENVIRONMENT_ERRNOS = (errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS, errno.EDQUOT)


def _interrupted(exc: BaseException) -> bool:
    """Whether a ``SystemExit`` came from a ``KeyboardInterrupt`` (its cause or context chain)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, KeyboardInterrupt):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _internal(exc: BaseException) -> SystemExit:
    """``error: internal: ...`` (exit 1) for an exception that is no user error, as ``main`` prints it."""
    if os.environ.get("SDWB_DEBUG") == "1":
        raise exc
    sys.stderr.write(
        f"error: internal: {type(exc).__name__}: {_one_line(exc)} (set SDWB_DEBUG=1 for a traceback)\n"
    )
    return SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; turn errors into one ``error:`` line on stderr and a non-zero exit code."""
    _quiet_libraries()
    start_window()  # no-op after sdwb.app's import started the window (kept for direct callers)
    try:
        code = app(args=argv, prog_name="sdwb", standalone_mode=False)
    except click_exceptions.NoArgsIsHelpError as e:  # `sdwb compress`: the group's help, as before
        e.show()
        sys.exit(e.exit_code)
    except click_exceptions.UsageError as e:  # typer's own usage errors: one line too
        where = e.ctx.command_path if e.ctx is not None else "sdwb"
        sys.stderr.write(f"error: {_one_line(e.format_message())} (see `{where} --help`)\n")
        sys.exit(e.exit_code)
    except click_exceptions.ClickException as e:
        sys.stderr.write(f"error: {_one_line(e.format_message())}\n")
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.stderr.write("error: interrupted\n")
        sys.exit(130)
    except SdwbError as e:
        if os.environ.get("SDWB_DEBUG") == "1":
            raise
        sys.stderr.write(f"error: {_one_line(e)}\n")
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        sys.exit(130)
    except SystemExit as e:  # typer turns Ctrl-C into exit 130 before the handler above sees it
        if e.code == 130 and _interrupted(e):
            sys.stderr.write("error: interrupted\n")
        raise
    except OSError as e:
        if os.environ.get("SDWB_DEBUG") == "1" or e.errno not in _ENVIRONMENT_ERRNOS:
            raise _internal(e) from None
        where = f"{e.filename}: " if e.filename else ""  # unreadable input, full disk: the user's to fix
        sys.stderr.write(f"error: {where}{e.strerror or _one_line(e)}\n")
        sys.exit(2)
    except Exception as e:
        if os.environ.get("SDWB_DEBUG") == "1":
            raise
        sys.stderr.write(
            f"error: internal: {type(e).__name__}: {_one_line(e)} (set SDWB_DEBUG=1 for a traceback)\n"
        )
        sys.exit(1)
    if code == 130:  # typer turns Ctrl-C into Exit(130), which non-standalone mode returns
        sys.stderr.write("error: interrupted\n")
    sys.exit(code if isinstance(code, int) and not isinstance(code, bool) else 0)  # as standalone click


if __name__ == "__main__":
    main()
