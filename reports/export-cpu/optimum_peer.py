"""Peer comparison: optimum-onnx's ``ORTStableDiffusionPipeline`` on the model our bench measured.

Runs in its OWN virtual environment (optimum-onnx 0.1.0 pins transformers<4.58, which conflicts
with sd-workbench's dependencies), so it imports nothing from sdwb:

    python3 -m venv /tmp/optimum-venv
    /tmp/optimum-venv/bin/pip install torch==2.13.0 optimum-onnx onnxruntime diffusers
    /tmp/optimum-venv/bin/python reports/export-cpu/optimum_peer.py \
        --model sdwb/assets/tiny-shapes --bench reports/export-cpu/tiny-shapes \
        --export-dir runs/optimum-tiny-shapes -o reports/export-cpu/optimum-peer.json

What it does: exports ``--model`` with optimum (``from_pretrained(export=True)``), reloads it with
ONNX Runtime's CPU provider and ``--threads`` intra-op threads, then takes the prompts, steps,
guidance, scheduler (DDIM) and seeds of the bench's torch baseline row from ``--bench``'s
results.json: image i from ``torch.Generator("cpu").manual_seed(seed + i)``, as sdwb does. It
reports PSNR of each image against the bench's torch images, and latency measured the way the
bench measures it (one warm-up, then ``--repeats`` single-image runs rotating through the prompts;
UNet / text encoder / VAE decoder calls timed by wrapping optimum's session wrappers' forward).
This is a separate process run after the bench, not interleaved with it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def psnr(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".onnx_data", ".data", ".plan")


def weights_sha256(directory: Path) -> str:
    """The digest sdwb's bench records as a row's ``weights_sha256`` (``sdwb.variants.files``:
    sha256 over sorted ``relative path:sha256`` lines of the weight files, safetensors winning per
    folder), recomputed here without importing sdwb, so the peer can refuse other weights."""
    import hashlib

    files: list[Path] = []
    folders = sorted({p.parent for p in directory.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file()})
    for folder in folders:
        here = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
        files += [p for p in here if p.suffix == ".safetensors"] or here
    digest = hashlib.sha256()
    for f in sorted(files):
        digest.update(f"{f.relative_to(directory).as_posix()}:{hashlib.sha256(f.read_bytes()).hexdigest()}\n".encode())
    return digest.hexdigest()


def compat_copy(src: Path, dst: Path) -> list[str]:
    """A copy of a transformers-5-saved pipeline that transformers 4.57 (optimum's pin) loads.

    Layout only, no weight changes: transformers 5 saves ``CLIPTextModel`` weights without the
    ``text_model.`` prefix 4.x expects (4.x would silently re-initialise them), and the tokenizer
    as ``tokenizer.json`` only, which 4.x's slow ``CLIPTokenizer`` (named in model_index.json)
    cannot read: the fast class reads that file as it is.
    """
    import shutil

    from safetensors.torch import load_file, save_file

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    changes = []
    weights = dst / "text_encoder" / "model.safetensors"
    tensors = load_file(weights)
    if not any(k.startswith("text_model.") for k in tensors):
        save_file({f"text_model.{k}": v for k, v in tensors.items()}, weights, metadata={"format": "pt"})
        changes.append("text_encoder/model.safetensors: keys prefixed with 'text_model.' (4.x layout)")
    index = json.loads((dst / "model_index.json").read_text())
    slow_without_vocab = not (dst / "tokenizer" / "vocab.json").exists()
    if index.get("tokenizer") == ["transformers", "CLIPTokenizer"] and slow_without_vocab:
        index["tokenizer"] = ["transformers", "CLIPTokenizerFast"]
        (dst / "model_index.json").write_text(json.dumps(index, indent=2))
        changes.append("model_index.json: tokenizer CLIPTokenizer -> CLIPTokenizerFast (tokenizer.json)")
    return changes


def wrap(module, name: str, log: dict) -> None:
    """Time every ``module.forward`` call into ``log[name]`` (seconds)."""
    inner = module.forward

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = inner(*args, **kwargs)
        log.setdefault(name, []).append(time.perf_counter() - start)
        return out

    module.forward = timed


def graph_compare(ours: Path, theirs: Path, threads: int, blocks: int = 4, block: int = 11) -> dict:
    """UNet graph alone: sdwb's and optimum's ``unet/model.onnx`` in one process, same session
    options, same random inputs at sdwb's opt point (batch 2 = one image under guidance), in
    alternating blocks of ``block`` runs (A B A B ...), the first run of each block not timed: an
    idle session's intra-op workers spin for a while after its last run and would steal a core
    from the other on this 2-core machine if single runs alternated. optimum's graph takes one
    timestep per sample, sdwb's one for the batch."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    entry = json.loads((ours / "manifest.json").read_text())["components"]["unet"]
    point = {axis: v["opt"] for axis, v in entry["axes"].items()}
    dims = {s["name"]: [d if isinstance(d, int) else point[d] for d in s["shape"]] for s in entry["inputs"]}
    rng = np.random.default_rng(0)
    sample = rng.standard_normal(dims["sample"]).astype(np.float32)
    states = rng.standard_normal(dims["encoder_hidden_states"]).astype(np.float32)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sessions, feeds, nodes = {}, {}, {}
    for name, d in (("sdwb", ours), ("optimum", theirs)):
        path = str(d / "unet" / "model.onnx")
        sessions[name] = sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        nodes[name] = len(onnx.load(path, load_external_data=False).graph.node)
        t = next(i for i in sess.get_inputs() if i.name == "timestep")
        shape = () if not t.shape else ((1,) if name == "sdwb" else (sample.shape[0],))
        timestep = np.full(shape, 500, dtype=np.int64 if "int64" in t.type else np.float32)
        feeds[name] = {"sample": sample, "timestep": timestep, "encoder_hidden_states": states}
    outs = {name: sess.run(None, feeds[name])[0] for name, sess in sessions.items()}  # warm-up
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(blocks):
        for name, sess in sessions.items():
            sess.run(None, feeds[name])  # not timed: the other session's workers settle
            for _ in range(block - 1):
                start = time.perf_counter()
                sess.run(None, feeds[name])
                times[name].append(time.perf_counter() - start)
    return {"unet_graph_ms": {k: 1000 * float(np.median(v)) for k, v in times.items()},
            "unet_graph_max_abs_diff": float(np.abs(outs["sdwb"] - outs["optimum"]).max()),
            "unet_graph_nodes": nodes, "batch": int(sample.shape[0]), "timed_runs": len(times["sdwb"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="diffusers directory (the bench's model)")
    p.add_argument("--bench", required=True, help="sdwb bench output directory (results.json, images/)")
    p.add_argument("--baseline", default=None, help="row whose settings/images to match (default: baseline)")
    p.add_argument("--export-dir", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--sdwb-export", default=None, help="sdwb export dir: also time both UNet graphs alone")
    p.add_argument("-o", "--output", required=True)
    args = p.parse_args()

    import numpy as np
    import onnxruntime as ort
    import torch
    from diffusers import DDIMScheduler
    from optimum.onnxruntime import ORTStableDiffusionPipeline
    from PIL import Image

    torch.set_num_threads(args.threads)
    bench = Path(args.bench)
    results = json.loads((bench / "results.json").read_text())
    rows = {r["variant"]: r for r in results["rows"]}
    base = rows[args.baseline or next(iter(rows.values()))["baseline"]]
    prompts = results["prompts"]
    ref_files = results["images"][base["variant"]]
    steps, guidance, seed = int(base["steps"]), float(base["guidance"]), int(base["seed"])
    digest = weights_sha256(Path(args.model))
    if base.get("weights_sha256") != digest:  # fail closed: compare the weights the bench measured
        raise SystemExit(f"error: {args.model} has weights {digest[:16]}, the bench row {base['variant']!r} "
                         f"measured {str(base.get('weights_sha256'))[:16]}: not the same model")
    out: dict = {"model": args.model, "weights_sha256": digest, "baseline_row": base["variant"],
                 "steps": steps, "guidance": guidance,
                 "seed": seed, "n_prompts": len(prompts), "threads": args.threads,
                 "machine": {"cpu": cpu_model(), "cores": os.cpu_count()}}
    import importlib.metadata as md

    out["libraries"] = {d: md.version(d) for d in ("optimum-onnx", "optimum", "onnxruntime", "diffusers",
                                                   "transformers", "torch")}
    export_dir = Path(args.export_dir)
    started = time.perf_counter()
    try:
        pipe = ORTStableDiffusionPipeline.from_pretrained(args.model, export=True)
    except Exception as exc:  # report exactly why optimum cannot take the model as saved
        out["direct_load_error"] = f"{type(exc).__name__}: {exc}"  # README: where it comes from
        source = export_dir.with_name(export_dir.name + "-source")
        out["compat_changes"] = compat_copy(Path(args.model), source)
        started = time.perf_counter()
        pipe = ORTStableDiffusionPipeline.from_pretrained(str(source), export=True)
    pipe.save_pretrained(export_dir)
    out["export_s"] = time.perf_counter() - started
    del pipe
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    pipe = ORTStableDiffusionPipeline.from_pretrained(str(export_dir), session_options=so,
                                                      provider="CPUExecutionProvider")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    log: dict[str, list[float]] = {}
    for attr, name in (("unet", "unet"), ("text_encoder", "text_encoder"), ("vae_decoder", "vae_decode")):
        wrap(getattr(pipe, attr), name, log)

    def run(prompt: str, image_seed: int):
        gen = torch.Generator("cpu").manual_seed(image_seed)
        images = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=gen,
                      output_type="np").images
        return Image.fromarray((images[0] * 255).round().clip(0, 255).astype(np.uint8))

    scores = []
    for i, prompt in enumerate(prompts):  # quality: image i with seed + i, vs the torch image i
        image = run(prompt, seed + i)
        with Image.open(bench / ref_files[i]) as ref:
            scores.append(psnr(ref.convert("RGB"), image))
    finite = [s for s in scores if np.isfinite(s)]
    out["psnr_vs_torch"] = {"mean": float(np.mean(finite)) if finite else float("inf"),
                            "min": float(min(scores)), "identical_images": len(scores) - len(finite)}
    for r in range(args.warmup):
        run(prompts[r % len(prompts)], seed)
    log.clear()
    per_image, unet, text, vae = [], [], [], []
    for r in range(args.repeats):
        log.clear()
        start = time.perf_counter()
        run(prompts[r % len(prompts)], seed)
        per_image.append(time.perf_counter() - start)
        unet.append(1000 * float(np.mean(log["unet"])))
        text.append(1000 * float(np.mean(log["text_encoder"])))
        vae.append(1000 * float(np.mean(log["vae_decode"])))
        out["unet_calls"], out["text_encoder_calls"] = len(log["unet"]), len(log["text_encoder"])
    out.update({"e2e_s_median": float(np.median(per_image)), "e2e_s_p10": float(np.percentile(per_image, 10)),
                "e2e_s_p90": float(np.percentile(per_image, 90)), "unet_ms_per_call": float(np.median(unet)),
                "text_encoder_ms": float(np.median(text)), "vae_decode_ms": float(np.median(vae)),
                "repeats": args.repeats})
    if args.sdwb_export:
        out["graph_compare"] = graph_compare(Path(args.sdwb_export), export_dir, args.threads)
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
