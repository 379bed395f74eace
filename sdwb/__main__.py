"""``python -m sdwb``: the same as the ``sdwb`` command."""

from sdwb.cli import main

main()
