"""The project's own error type.

Every failure a user can cause (bad config, bad file, unknown class) is raised as a
:class:`CoregError` whose message is one line naming the problem and the file, row or
field. The CLI prints that line and exits non-zero; anything else is a bug.
"""

from __future__ import annotations


class CoregError(Exception):
    """A user-facing failure with a one-line, self-explaining message."""

    def __init__(self, message: str) -> None:
        # Keep messages on one line so logs and CLIs show them whole.
        super().__init__(" ".join(str(message).split()))
