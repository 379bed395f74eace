"""The one error type users see: a one-line message naming the input and what was expected.

Why: bad input (missing model, malformed YAML, corrupt weights, NaN outputs, unsupported
backend) must end in a clear line and a non-zero exit, never a bare traceback. Library code
raises ``SdwbError``; the CLI catches it, prints ``error: <message>`` and exits with ``exit_code``.
"""

from __future__ import annotations


class SdwbError(Exception):
    """A user-facing error. ``str(err)`` is a single line; ``exit_code`` is what the CLI returns."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(" ".join(str(message).split()))
        if exit_code is not None:
            self.exit_code = exit_code
