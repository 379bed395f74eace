"""An image grid of edits for a report: per builtin:shapes-edit case, input | mask | each variant's edit.

Why a tool beside ``sdwb bench``: the benchmark keeps numbers, not its edited images; the grid
shows what the numbers mean. The edits are made exactly as the bench's edit metric makes them
(same cases, seeds ``seed + case``, the variant's own steps and guidance), at one strength::

    python -m tools.edit_grid -c configs/bench/editing-cpu.yaml --strength 0.6 --cases 8 \
        -o reports/editing-cpu/grid.png
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _runner(s):
    """The pipeline a scenario runs (torch spec, or an export directory on its backend)."""
    if s.backend == "torch":
        from sdwb.loading import load_pipeline

        return load_pipeline(s.model)
    from sdwb.backends.registry import check_model, open_exported

    return open_exported(s.backend, check_model(s.backend, s.model), threads=s.threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", required=True, help="bench config (its variants, one row each)")
    parser.add_argument("--strength", type=float, default=0.6, help="the rows with this edit_strength")
    parser.add_argument("--cases", type=int, default=8, help="first N cases of builtin:shapes-edit")
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args(argv)

    from PIL import Image

    from bench.scenario import load_bench_config
    from sdwb.app.recipe_run import resolve_recipe_models
    from sdwb.edit import edit
    from sdwb.generate import captioned_grid
    from sdwb.shapes_edit import edit_cases

    config = resolve_recipe_models(load_bench_config(args.config))
    rows = [s for s in config.scenarios() if abs(s.edit_strength - args.strength) < 1e-9]
    cases = edit_cases(args.cases)
    columns: dict[str, list] = {}
    for s in rows:
        pipe = _runner(s)
        columns[s.variant] = [edit(pipe, c.image(), [c.prompt], strength=s.edit_strength, mask=c.mask(),
                                   steps=s.steps, guidance=s.guidance, seed=s.seed + c.index,
                                   scheduler=s.scheduler, progress=False)[0] for c in cases]
    images, captions = [], []
    for i, c in enumerate(cases):
        mask = c.mask() or Image.new("L", c.image().size, 0)
        images += [c.image(), mask.convert("RGB")]
        captions += [f"input: {c.source.caption}", f"{c.kind}: {c.prompt}"]
        for name, edited in columns.items():
            images.append(edited[i])
            captions.append(name)
    grid = captioned_grid(images, captions, columns=2 + len(columns), max_lines=3)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.output)
    print(f"wrote {args.output} ({len(cases)} cases x {len(columns)} variants at strength {args.strength})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
