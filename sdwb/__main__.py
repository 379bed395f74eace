"""``python -m sdwb``: the same as the ``sdwb`` command."""

from sdwb.app.cli import main

main()
