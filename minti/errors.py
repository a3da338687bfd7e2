"""The one exception type for a user's mistake: the CLI prints it as one line, never a traceback."""
from __future__ import annotations

import errno
import os
from pathlib import Path


class UserError(Exception):
    """A problem with the user's input (a file, a flag, a value): the message names it and the fix.

    The CLI exits with `exit_status`: 2 for input it refuses, as argparse does for a bad flag."""
    exit_status = 2


class RunError(UserError):
    """A run that started and then could not go on (a diverged loss, a full disk): still one line
    naming what happened and what was kept, but exit status 1, since the command itself was fine."""
    exit_status = 1


def missing_path(path: str | os.PathLike) -> str:
    """Why `path` cannot be opened, in a few words ("does not exist", "is a symbolic link loop",
    ...), for a path that os.path.exists() says is not there: a broken or looping link reads as
    missing to exists(), but the fix differs."""
    path = Path(path)
    if path.is_symlink():
        try:
            path.resolve(strict=True)
        except RuntimeError:  # Python < 3.13 reports a loop this way
            return "is a symbolic link loop (it points back at itself): fix the link"
        except OSError as e:
            if e.errno == errno.ELOOP:
                return "is a symbolic link loop (it points back at itself): fix the link"
            return f"is a broken symbolic link (to {os.readlink(path)}, which does not exist): fix the link"
    try:
        path.stat()
    except PermissionError:
        return "cannot be reached (permission denied on a folder above it)"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symbolic link loop (a folder above it points back at itself): fix the link"
    return "does not exist"
