"""Screenshot a report page the way a reader first sees it: headless Chromium, one window, no scroll.

Why: #24 asks that the demo report's verdict and quality columns be visible without scrolling;
this makes the check reproducible (``apt-get install chromium`` on Debian)::

    python -m tools.report_screenshot runs/demo/report/report.html -o shot.png --size 1280x900
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("page", type=Path, help="report.html")
    p.add_argument("-o", "--out", type=Path, required=True, help="PNG to write")
    p.add_argument("--size", default="1280x900", help="window WIDTHxHEIGHT in CSS pixels")
    args = p.parse_args(argv)
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                    if shutil.which(n)), None)
    if browser is None:
        print("error: no chromium on PATH (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    if not args.page.is_file():
        print(f"error: {args.page}: no such file", file=sys.stderr)
        return 2
    width, height = (int(v) for v in args.size.lower().split("x"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--window-size={width},{height}", f"--screenshot={args.out.resolve()}",
                           args.page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or not args.out.is_file():
        print(f"error: chromium failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({width}x{height})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
