"""Write (or check) the ``sdwb-files.json`` of the shipped builtin models.

Why: the loader refuses a builtin whose files differ from this list (``sdwb.verify``), so a
flipped byte in ``sdwb/assets/`` is an error instead of a silently different model. Run it after
producing or replacing a builtin's files (``sdwb baseline train --install`` writes the list
itself; ``sdwb compress distill ... -o sdwb/assets/tiny-shapes-4step`` does not), then commit the
list with the files. Builtins built in code (``sd15-arch``, ``sdxl-arch``) have no files.

    .venv/bin/python -m tools.builtin_manifest                  # every shipped builtin
    .venv/bin/python -m tools.builtin_manifest tiny-shapes-4step
    .venv/bin/python -m tools.builtin_manifest --check          # verify; exit 1 on a difference
"""

from __future__ import annotations

import argparse
import sys

from sdwb.errors import SdwbError
from sdwb.verify import verify_builtin, write_files_manifest
from sdwb.zoo import get_builtin, list_models


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="builtin names (default: every shipped builtin)")
    parser.add_argument("--check", action="store_true", help="verify the lists instead of writing them")
    args = parser.parse_args(argv)
    try:
        models = [get_builtin(n) for n in args.names] or [m for m in list_models() if m.asset]
        failed = 0
        for model in models:
            if model.asset is None:
                print(f"{model.name}: built in code, no files to list")
                continue
            if not model.available():
                print(f"{model.name}: not shipped here ({model.path}); skipped")
                continue
            if args.check:
                try:
                    verify_builtin(model.name, model.path)
                    print(f"{model.name}: ok")
                except SdwbError as e:
                    failed += 1
                    print(f"{model.name}: {e}")
            else:
                print(f"wrote {write_files_manifest(model.path, model.name)}")
        return 1 if failed else 0
    except SdwbError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
