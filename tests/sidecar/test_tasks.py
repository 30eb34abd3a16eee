"""Stopping background tasks: a lost cancellation must not hang a stop."""

from __future__ import annotations

import asyncio

from lcic_guard.tasks import stop_task, stop_tasks


def stubborn(lost: list[int], times: list[int]) -> asyncio.Task[None]:
    """A loop that loses its first ``times[0]`` cancellations, as one waiting
    in Python 3.11's asyncio.wait_for does when the cancellation lands as the
    awaited call completes."""

    async def run() -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if len(lost) < times[0]:
                    lost.append(1)
                    continue
                raise

    return asyncio.create_task(run())


async def test_a_task_that_loses_a_cancellation_is_still_stopped() -> None:
    lost: list[int] = []
    task = stubborn(lost, [2])
    await asyncio.sleep(0)
    # The old way (cancel once, then await) would wait for this task forever.
    await asyncio.wait_for(stop_task(task), 10)
    assert task.cancelled() and len(lost) == 2


async def test_a_task_that_never_stops_is_left_after_the_timeout() -> None:
    lost: list[int] = []
    times = [10**9]
    task = stubborn(lost, times)
    await asyncio.sleep(0)
    await asyncio.wait_for(stop_task(task, timeout=0.5), 10)
    assert not task.done() and len(lost) >= 2
    times[0] = 0  # let it go: the next cancellation ends it
    task.cancel()
    await asyncio.wait({task}, timeout=5)
    assert task.done()


async def test_finished_and_failed_tasks_stop_quietly() -> None:
    async def fail() -> None:
        raise RuntimeError("boom")

    done = asyncio.create_task(asyncio.sleep(0))
    failed = asyncio.create_task(fail())
    await asyncio.sleep(0.01)
    await stop_tasks([done, failed])
    await stop_task(None)
    assert done.done() and failed.done()
