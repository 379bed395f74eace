"""Committed results name the weights they measured, and a builtin's must be what is shipped now.

A results file records, per row, ``weights_sha256`` (bench rows) or a ``models`` table (tools such as
``tools.lora_table``): the digest of the weight files of each model it ran. When a builtin is retrained
or re-distilled, every report that measured the old weights fails here until it is re-measured, or its
directory holds ``SUPERSEDED.md`` saying why it is kept (and then the README must not quote it as
current). A row that names a builtin with weight files but records no digest (written before the
digests existed) is a problem too: what it measured cannot be checked, so it is re-measured or marked.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUPERSEDED = "SUPERSEDED.md"


def _digest(row: dict) -> str | None:
    """The digest of the builtin a row names: its own weights, or for a row the bench exported
    itself (``export_dir``) the source it exported (``source_weights_sha256``; None if unrecorded,
    since ``weights_sha256`` then names the export, not the builtin)."""
    key = "source_weights_sha256" if row.get("export_dir") else "weights_sha256"
    return row[key] if isinstance(row.get(key), str) else None


def _recorded(data: dict) -> list[tuple[str, str | None]]:
    """``(builtin spec, its recorded digest or None)`` for every builtin a results file measured."""
    rows = [row for row in data.get("rows", []) if isinstance(row, dict)
            and str(row.get("model", "")).startswith("builtin:")]
    models = data.get("models") or {}
    pairs = [(row["model"], _digest(row) or models.get(row["model"])) for row in rows]
    pairs += [(spec, digest) for spec, digest in models.items() if spec.startswith("builtin:")]
    from sdwb.variants.files import BUILT_IN_CODE

    return [(spec, digest) for spec, digest in pairs if digest != BUILT_IN_CODE]


def stale_results(reports: Path) -> tuple[list[str], int]:
    """``(problems, digests checked)`` over every results.json under ``reports`` not marked superseded."""
    from sdwb.loading import spec_digest
    from sdwb.variants.files import BUILT_IN_CODE

    shipped: dict[str, str] = {}
    problems, checked = [], 0
    for path in sorted(reports.rglob("results.json")):
        if any((parent / SUPERSEDED).is_file() for parent in path.parents if parent.is_relative_to(reports)):
            continue
        for spec, digest in _recorded(json.loads(path.read_text())):
            if spec not in shipped:
                shipped[spec] = spec_digest(spec)
            if shipped[spec] == BUILT_IN_CODE:  # no weights to name
                continue
            checked += 1
            if digest is None:
                problems.append(f"{path.relative_to(reports)}: {spec}: records no weights digest "
                                "(measured before results named their weights)")
            elif digest != shipped[spec]:
                problems.append(f"{path.relative_to(reports)}: {spec} measured weights {digest[:12]}, "
                                f"shipped {shipped[spec][:12]}")
    return sorted(set(problems)), checked


def test_committed_results_measured_the_shipped_builtins():
    problems, checked = stale_results(ROOT / "reports")
    assert not problems, "re-measure these (or add SUPERSEDED.md): " + "; ".join(problems)
    assert checked > 0  # reports/lora-cpu records its models' digests


def test_a_result_on_other_weights_is_found_unless_superseded(tmp_path):
    report = tmp_path / "old-report"
    report.mkdir()
    (report / "results.json").write_text(json.dumps({"rows": [
        {"model": "builtin:tiny-shapes", "weights_sha256": "0" * 64},
        {"model": "builtin:sd15-arch", "weights_sha256": "built in code"}]}))
    problems, checked = stale_results(tmp_path)
    assert checked == 1 and len(problems) == 1 and "builtin:tiny-shapes" in problems[0]
    older = tmp_path / "older-report"  # written before rows named their weights: unverifiable
    older.mkdir()
    (older / "results.json").write_text(json.dumps({"rows": [
        {"model": "builtin:tiny-shapes-4step"}, {"model": "builtin:sd15-arch"}]}))
    problems, checked = stale_results(tmp_path)
    assert checked == 2 and any("older-report" in p and "records no weights digest" in p for p in problems)
    (older / SUPERSEDED).write_text("measured before results named their weights\n")
    exported = tmp_path / "exported"  # an onnxruntime row of a builtin: its weights_sha256 names the export
    exported.mkdir()
    (exported / "results.json").write_text(json.dumps({"rows": [
        {"model": "builtin:tiny-shapes", "export_dir": "exports/ort", "weights_sha256": "1" * 64}]}))
    problems, _ = stale_results(tmp_path)
    assert any("exported" in p and "records no weights digest" in p for p in problems)
    from sdwb.loading import spec_digest

    (exported / "results.json").write_text(json.dumps({"rows": [
        {"model": "builtin:tiny-shapes", "export_dir": "exports/ort", "weights_sha256": "1" * 64,
         "source_weights_sha256": spec_digest("builtin:tiny-shapes")}]}))
    assert not [p for p in stale_results(tmp_path)[0] if "exported" in p]
    (report / SUPERSEDED).write_text("kept for the record: measured on the previous weights\n")
    assert stale_results(tmp_path) == ([], 1)  # only the exported row's source is left to check
