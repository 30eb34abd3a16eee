"""Stopping background tasks for certain.

A plain ``task.cancel(); await task`` waits forever when the task does not end:
Python 3.11's ``asyncio.wait_for`` (used by libraries as well as by us) loses
a cancellation that lands just as the call it awaits completes, and a loop
around it then simply goes on. A sidecar stopping that way ignores SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

log = logging.getLogger(__name__)


async def stop_task(task: asyncio.Task[Any] | None, *, timeout: float = 5.0) -> None:
    """Cancel ``task`` until it has ended (asking again if a cancellation was
    lost), waiting at most ``timeout`` seconds; its result or error is dropped."""
    if task is None:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.2)
        if not task.done() and loop.time() >= deadline:
            log.warning("task %s did not stop within %.0f s; left behind", task.get_name(), timeout)
            return
    if not task.cancelled():
        with contextlib.suppress(Exception):
            task.exception()  # retrieved, so asyncio does not log it as never retrieved


async def stop_tasks(tasks: list[asyncio.Task[Any]], *, timeout: float = 5.0) -> None:
    """:func:`stop_task` for several tasks at once."""
    await asyncio.gather(*(stop_task(t, timeout=timeout) for t in tasks))


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until ``event`` is set or ``timeout`` seconds have passed; True
    if it is set.

    Not ``asyncio.timeout`` (nor ``wait_for``) around ``event.wait()``: in
    Python 3.11 both time out by cancelling the waiting task, and a
    cancellation from outside that lands as the timeout fires can be taken
    for the timeout and lost, leaving a loop around the wait running after
    it was cancelled. ``asyncio.wait`` times out without cancelling anyone."""
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()
    return event.is_set()
