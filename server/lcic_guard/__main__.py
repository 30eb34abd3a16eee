"""The ``lcic-guard`` program (also ``python -m lcic_guard``).

Its own small module so that the first thing it does, before the imports
that take a good part of a second, is to make Ctrl-C end it quietly with
exit status 130: a Ctrl-C that lands while the program is still starting
must not print a KeyboardInterrupt traceback.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType


def _interrupted(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(130)


def main() -> int:
    # Not when SIGINT is ignored (a background job, nohup): that is kept.
    ours = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if ours:
        signal.signal(signal.SIGINT, _interrupted)
    from lcic_guard.cli import main as run

    if ours:
        # From here on the command handles Ctrl-C itself (KeyboardInterrupt,
        # or the servers' own signal handlers): exit status 130 too.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    code = run()
    if code == INTERRUPTED:
        _leave(code)
    return code


INTERRUPTED = 130


def _leave(code: int) -> None:
    """Exit at once after Ctrl-C. The command has stopped its servers and its
    private Redis on the way out, but a Ctrl-C that lands while they start
    can leave a worker thread (gRPC's, an executor's) waiting for work that
    never comes, and Python's exit would wait for it for ever."""
    import contextlib
    import logging
    import os

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more to say
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
