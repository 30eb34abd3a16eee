"""Failures a person can fix, reported as one line.

A command raises :class:`CommandError` for an expected failure (a bad
address, a Redis or sidecar that cannot be reached, a file that cannot be
read, a port that is taken); ``lcic-guard`` prints its text on one line and
exits 2. A traceback is printed only with ``--debug``.
"""

from __future__ import annotations

import errno
from pathlib import Path


class CommandError(Exception):
    """What failed and what to do about it, in one line."""


def readable_text_file(path: Path, flag: str) -> str:
    """The text of ``path`` (UTF-8), or a :class:`CommandError` naming ``flag``."""
    what = f"{flag} {path}" if flag else str(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CommandError(f"{what}: no such file") from None
    except IsADirectoryError:
        raise CommandError(f"{what}: is a directory; give a file of events") from None
    except PermissionError:
        raise CommandError(f"{what}: permission denied") from None
    except OSError as exc:
        raise CommandError(f"{what}: cannot read it ({exc.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandError(
            f"{what}: not a text file (not UTF-8); give a file of JSON lines"
        ) from None
    if "\0" in text:
        raise CommandError(f"{what}: not a text file; give a file of JSON lines")
    return text


def check_readable(path: Path, flag: str) -> None:
    """Fail now, not later inside a loop, when ``path`` cannot be read."""
    readable_text_file(path, flag)


def bind_error(listen: str, exc: OSError | None = None) -> CommandError:
    """The one line for a listen address that cannot be used."""
    if exc is not None and exc.errno == errno.EADDRINUSE:
        return CommandError(
            f"cannot listen on {listen}: the address is already in use (another "
            "lcic-guard or another program holds it); stop it or choose another --listen"
        )
    why = f" ({exc.strerror})" if exc is not None and exc.strerror else ""
    return CommandError(f"cannot listen on {listen}{why}; check --listen (HOST:PORT)")
