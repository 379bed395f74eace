"""The application layer: the ``sdwb`` command line, the recipe schema and the recipe runner.

The only code that imports every stage (``compress``, ``export``, ``bench``): it turns command
lines and recipes into calls of the stages, chains their artifacts (``recipe:`` model specs are
resolved here) and prints their results. Below it, the core (``sdwb``) imports no stage, and a
stage never imports a stage after it (``tests/test_layers.py`` holds all of this to account).
"""

from sdwb.threads import start_window

# First thing a command does: start the short window whose load decides the default thread count
# (sdwb.threads), so the CLI's own imports overlap it instead of the command waiting for it.
start_window()
