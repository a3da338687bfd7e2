"""The one exception type for a user's mistake: the CLI prints it as one line, never a traceback."""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (a file, a flag, a value): the message names it and the fix."""
