"""A release is committed on evidence (SPEC R10, issue 19), end to end: a real
redis-server, real ``lcic-guard reconcile`` processes, the billing stream
and the announcements stream.

* finding 2: a hold cleared by a fact dated a little ahead is not released
  without a notice made a full notice period before;
* finding 3: Redis restarted from an older snapshot (a payment lost) pauses
  every release: the paying account is not released;
* finding 4: a leader killed before its notice settled, the next one started
  after ``release_at``: the release waits the notice period after the notice.

Durations are seconds (the policy's flags), so nothing waits for days; the
assertions compare the times Redis gave the stream entries, never the clock
of this test.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
from lcic_guard.demo import EmbeddedRedis, free_port
from lcic_guard.domain.policy import DAY, HOUR, SECOND
from lcic_guard.domain.time import Millis, wall_clock
from lcic_guard.store.keys import BILLING_STREAM, GUARD_STREAM

from tests.support.events import Events

LCIC_GUARD = str(Path(sys.executable).with_name("lcic-guard"))
ACCT = "acct-e"
APP = "app-e"


def wait_for(what: str, cond: Callable[[], bool], timeout: float, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def policy_flags(notice: str) -> list[str]:
    return [
        "--grace",
        "1s",
        "--release-after",
        "2s",
        "--release-notice",
        notice,
        "--release-margin",
        "0s",
    ]


@contextmanager
def reconcile(url: str, log: Path, *flags: str) -> Iterator[subprocess.Popen[bytes]]:
    """One ``lcic-guard reconcile`` process; always killed on exit."""
    out = log.open("ab")
    proc = subprocess.Popen(
        [LCIC_GUARD, "reconcile", "--redis-url", url, "--claim-idle", "500ms", *flags],
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    out.close()
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def publish(r: redis.Redis, *evs: dict[str, Any]) -> None:
    for e in evs:
        r.xadd(BILLING_STREAM, {"event": json.dumps(e)})


def announced(r: redis.Redis, kind: str) -> list[tuple[Millis, dict[str, Any]]]:
    """The announcements of one type, with the time Redis gave each entry."""
    out = []
    rows: Any = r.xrange(GUARD_STREAM)
    for eid, fields in rows:
        event = json.loads(fields[b"event"])
        if event["type"] == kind and event.get("account_id") == ACCT:
            out.append((int(eid.decode().split("-")[0]), event))
    return out


def recorded(r: redis.Redis, event_id: str) -> bool:
    return bool(r.hexists(f"lcic:acct:{{{ACCT}}}:facts", event_id))


def overdue_long_ago(events: Events, now: Millis) -> list[dict[str, Any]]:
    """An app with a package for ages, overdue since 100 days: with the short
    policy, its release falls due a notice period after it is read."""
    return [
        *events.app(ACCT, APP, at=now - 200 * DAY, expires=now + 400 * DAY),
        events("overdue_alert", now - 100 * DAY, account_id=ACCT, amount_due="12.00"),
    ]


def assert_noticed_in_time(r: redis.Redis, notice_ms: int) -> None:
    """Every release of the account comes a full notice period after a
    ``release_scheduled`` for it (Redis's times of the stream entries)."""
    released = announced(r, "resources_released")
    notices = [t for t, _ in announced(r, "release_scheduled")]
    for at, _ in released:
        before = [t for t in notices if t + notice_ms <= at]
        assert before, f"released at {at} with notices only at {notices}"


# ---------------------------------------------------------------------------


def test_finding_4_a_notice_cut_short_by_a_crash_delays_the_release(tmp_path: Path) -> None:
    notice = 6 * SECOND
    with EmbeddedRedis() as server:
        r = redis.Redis.from_url(server.url)
        events = Events()
        evs = overdue_long_ago(events, wall_clock())
        flags = [*policy_flags("6s"), "--announce-settle", "4s"]
        publish(r, *evs)
        with reconcile(server.url, tmp_path / "a.log", *flags) as first:
            # Killed once it recorded the alert, before its notice settled.
            wait_for("the alert recorded", lambda: recorded(r, evs[-1]["event_id"]), 30)
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
        assert announced(r, "release_scheduled") == []
        # The next leader starts after release_at (the alert's recording + 6 s).
        time.sleep(7)
        with reconcile(server.url, tmp_path / "b.log", *flags):
            wait_for("the release", lambda: bool(announced(r, "resources_released")), 40)
        [(released_at, _)] = announced(r, "resources_released")
        notices = announced(r, "release_scheduled")
        assert notices, "released with no notice at all"
        first_notice = min(t for t, _ in notices)
        assert released_at - first_notice >= notice, (first_notice, released_at)
        assert_noticed_in_time(r, notice)
        r.close()


def test_finding_2_a_hold_cleared_ahead_is_released_only_after_a_notice(tmp_path: Path) -> None:
    notice = 4 * SECOND
    with EmbeddedRedis() as server:
        r = redis.Redis.from_url(server.url)
        events = Events()
        now = wall_clock()
        flags = [*policy_flags("4s"), "--announce-settle", "500ms"]
        hold = events(
            "release_hold_set",
            now - HOUR,
            account_id=ACCT,
            actor="alice@support",
            reason="ticket 1",
        )
        publish(r, *overdue_long_ago(events, now), hold)
        with reconcile(server.url, tmp_path / "r.log", *flags):
            wait_for("the hold recorded", lambda: recorded(r, hold["event_id"]), 30)
            time.sleep(1.5)  # settled: held, so no notice is due
            assert announced(r, "release_scheduled") == []
            clear = events(
                "release_hold_cleared",
                wall_clock() + 3 * SECOND,  # a little ahead of the clocks
                account_id=ACCT,
                actor="bob@support",
                reason="ticket 2",
            )
            publish(r, clear)
            wait_for("the release", lambda: bool(announced(r, "resources_released")), 40)
        assert announced(r, "release_scheduled"), "released with no notice at all"
        assert_noticed_in_time(r, notice)
        r.close()


def _metric(port: int, name: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in body.splitlines():
        if line.startswith(name):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


def test_finding_3_a_redis_restart_from_an_older_snapshot_pauses_every_release(
    tmp_path: Path,
) -> None:
    """Notice 16 s: the lost facts give a release 16 s after the alert was
    read (the old build released then); the restart comes about 6 s after
    it, so the pause holds every release until about 22 s. Billing sends the
    lost payment again in between, and the account is never released."""
    server = EmbeddedRedis().start()
    metrics_port = free_port()
    try:
        r = redis.Redis.from_url(server.url)
        events = Events()
        evs = overdue_long_ago(events, wall_clock())
        flags = [
            *policy_flags("16s"),
            "--announce-settle",
            "500ms",
            "--metrics-listen",
            f"127.0.0.1:{metrics_port}",
        ]
        with reconcile(server.url, tmp_path / "r.log", *flags):
            read = time.monotonic()
            publish(r, *evs)
            wait_for("the first notice", lambda: bool(announced(r, "release_scheduled")), 30)
            r.save()  # the snapshot Redis will come back from
            paid = events("arrears_settled", wall_clock(), account_id=ACCT)
            publish(r, paid)
            wait_for("the payment applied", lambda: recorded(r, paid["event_id"]), 30)

            # Redis dies and comes back from the snapshot: the payment is lost.
            time.sleep(max(0.0, read + 6 - time.monotonic()))
            server.kill()
            server.start()
            r = redis.Redis.from_url(server.url)
            assert not recorded(r, paid["event_id"])

            # Past the release time the lost facts give: not released.
            time.sleep(max(0.0, read + 19 - time.monotonic()))
            assert announced(r, "resources_released") == []
            pauses = _metric(metrics_port, 'lcic_guard_release_pauses_total{cause="run_id"}')
            assert pauses == 1
            plan = subprocess.run(
                [LCIC_GUARD, "release-plan", "--redis-url", server.url, *policy_flags("16s")],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert plan.returncode == 0, plan.stderr
            assert "RELEASES PAUSED" in plan.stdout and "run_id" in plan.stdout, plan.stdout
            ready = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz", timeout=5)
            assert "RELEASES PAUSED" in ready.read().decode()

            # Billing sends the payment again: the account is never released.
            publish(r, paid)
            wait_for("the payment applied again", lambda: recorded(r, paid["event_id"]), 30)
            time.sleep(max(0.0, read + 26 - time.monotonic()))
            assert announced(r, "resources_released") == []
        log = (tmp_path / "r.log").read_text()
        assert log.count("may have lost acknowledged writes") == 1, log
        r.close()
    finally:
        server.stop()
