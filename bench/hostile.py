"""Probe the sidecar as a hostile or careless client would, through
``lcic-guard serve`` (a real process) and a private redis-server:

1. a cold sidecar (checks sent the moment its port opens) asked about 1,000
   suspended applications in one CheckBatch, ``--runs`` times;
2. 50,000 never-seen ids in CheckBatches of 1,000, and the server's RSS;
3. forged classroom reports (a start 1 s before the suspension with a
   scheduled end in year 5000; an end in 1970);
4. FLUSHALL and a snapshot reload (the app back at version 1, suspended):
   how long until the sidecar answers what Redis holds;
5. 100,000 distinct room ids checked on one suspended application, and the
   server's RSS;
6. 200 raw TCP connections that never send the HTTP/2 preface: how many are
   still open 15 s later;
7. one classroom report stored with a scheduled end of 9999-12-31 (as Lua's
   cjson stores it, a float) in a CheckBatch of 1,000 enter checks;
8. a watch stream on an application whose grace ends 2 s later (no new
   record at that instant): what it sends then.

    .venv/bin/python bench/hostile.py
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from lcic.guard.v1 import enforcement_pb2 as pb
from lcic.guard.v1 import enforcement_pb2_grpc as pb_grpc
from lcic_guard.demo import EmbeddedRedis, free_port
from lcic_guard.domain.policy import DAY, AppStatus, Reason, Segment
from lcic_guard.domain.time import wall_clock
from lcic_guard.store.connect import connect
from lcic_guard.store.status import Store

YEAR_5000 = 95_617_584_000_000


def suspended(app_id: str, version: int, now: int) -> AppStatus:
    seg = Segment(
        now - 2 * DAY,
        (Reason.ACCOUNT_OVERDUE,),
        grace_ends_at=now - 2 * DAY,
        suspended_at=now - 2 * DAY,
        release_at=now + 50 * DAY,
    )
    return AppStatus(app_id, "acct-" + app_id, (Segment(now - 10 * DAY), seg), version, now)


def active(app_id: str, version: int, now: int) -> AppStatus:
    return AppStatus(app_id, "acct-" + app_id, (Segment(now - 10 * DAY),), version, now)


def recordings(ids: list[str]) -> pb.CheckBatchRequest:
    return pb.CheckBatchRequest(
        checks=[
            pb.Check(access_recording=pb.CanAccessRecordingRequest(app_id=a, recording_id="r"))
            for a in ids
        ]
    )


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def serve(url: str, port: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "lcic_guard.cli", "serve", "--redis-url", url]
    cmd += ["--listen", f"127.0.0.1:{port}", "--max-heartbeat-age", "0"]
    env = {**os.environ, "LCIC_GUARD_LOG_LEVEL": "WARNING"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def announce(store: Store, status: AppStatus) -> None:
    await store.write_status(status)


def stopped(proc: subprocess.Popen[bytes]) -> bool:
    """SIGTERM, and whether it exited within 15 s (killed otherwise)."""
    proc.terminate()
    try:
        proc.wait(15)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False


async def wait_port(port: int) -> None:
    while True:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.005)


async def main(runs: int = 5) -> None:
    with EmbeddedRedis() as redis:
        store = Store(connect(redis.url))
        now = wall_clock()
        apps = [f"app-s{i}" for i in range(1000)]
        for i in range(0, 1000, 200):
            await asyncio.gather(
                *(store.write_status(suspended(a, 1, now)) for a in apps[i : i + 200])
            )
        await store.write_status(active("app-g", 42, now))

        # 1. cold sidecar, 1,000 suspended apps in one batch
        allowed_runs = []
        stop_slow = 0
        for _ in range(runs):
            port = free_port()
            proc = serve(redis.url, port)
            try:
                await wait_port(port)
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                    stub = pb_grpc.EnforcementServiceStub(ch)
                    resp = await stub.CheckBatch(recordings(apps), timeout=10)
                    allowed_runs.append(sum(d.allowed for d in resp.decisions))
            finally:
                stop_slow += not stopped(proc)
        print(f"1. cold CheckBatch of 1,000 suspended apps, allowed per run: {allowed_runs}")
        print(f"   servers that did not exit within 15 s of SIGTERM: {stop_slow}/{runs}")

        port = free_port()
        proc = serve(redis.url, port)
        try:
            await wait_port(port)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = pb_grpc.EnforcementServiceStub(ch)
                await asyncio.sleep(1.0)  # let it load the table
                # 2. unknown flood
                before = rss_mb(proc.pid)
                allowed = 0
                for n in range(50):
                    ids = [f"nobody-{n}-{i}" for i in range(1000)]
                    resp = await stub.CheckBatch(recordings(ids), timeout=10)
                    allowed += sum(d.allowed for d in resp.decisions)
                after = rss_mb(proc.pid)
                print(
                    f"2. 50,000 never-seen ids: {allowed} allowed; RSS {before:.1f} MB -> "
                    f"{after:.1f} MB"
                )
                # 3. forged reports
                forged = pb.ReportClassroomStartedRequest(app_id="app-s1", room_id="forged")
                forged.started_at.FromMilliseconds(now - 2 * DAY - 1000)
                forged.scheduled_end_time.FromMilliseconds(YEAR_5000)
                ended = pb.ReportClassroomEndedRequest(app_id="app-s1", room_id="real")
                ended.ended_at.FromMilliseconds(0)
                for name, call in (
                    (
                        "start 1 s before the suspension, end in 5000",
                        stub.ReportClassroomStarted(forged, timeout=5),
                    ),
                    ("end in 1970", stub.ReportClassroomEnded(ended, timeout=5)),
                ):
                    try:
                        await call
                        code = "OK (believed)"
                    except grpc.aio.AioRpcError as exc:
                        code = f"{exc.code().name}: {exc.details()}"
                    print(f"3. forged report ({name}): {code}")
                enter = await stub.CanEnterClassroom(
                    pb.CanEnterClassroomRequest(app_id="app-s1", room_id="forged"), timeout=5
                )
                d = enter.decision
                reason = pb.DecisionReason.Name(d.reason)
                print(f"   enter the forged room: allowed={d.allowed} reason={reason}")
                # 4. FLUSHALL and reload (the app checked first, so that it is held)
                first = await stub.CheckBatch(recordings(["app-g"]), timeout=5)
                assert first.decisions[0].allowed
                await store.redis.flushall()
                reloaded = suspended("app-g", 1, wall_clock())
                await store.write_status(reloaded)
                t0 = time.monotonic()
                took = None
                while time.monotonic() - t0 < 10:
                    r = await stub.CheckBatch(recordings(["app-g"]), timeout=5)
                    if not r.decisions[0].allowed and r.decisions[0].status_version == 1:
                        took = time.monotonic() - t0
                        break
                    await asyncio.sleep(0.01)
                shown = f"{took:.2f} s" if took is not None else "not within 10 s"
                print(f"4. FLUSHALL + reload answered right after: {shown}")
                # 5. room ids
                # Written and announced, as the reconciler does.
                await announce(store, suspended("app-r", 1, wall_clock()))
                await asyncio.sleep(0.5)
                before = rss_mb(proc.pid)
                for n in range(100):
                    req = pb.CheckBatchRequest(
                        checks=[
                            pb.Check(
                                enter_classroom=pb.CanEnterClassroomRequest(
                                    app_id="app-r", room_id=f"room-{n}-{i}"
                                )
                            )
                            for i in range(1000)
                        ]
                    )
                    await stub.CheckBatch(req, timeout=10)
                after = rss_mb(proc.pid)
                print(f"5. 100,000 room ids on one app: RSS {before:.1f} MB -> {after:.1f} MB")
                # 7. a poisoned room in a batch
                now = wall_clock()
                await announce(store, suspended("app-p", 1, now))
                await store.redis.hset(
                    "lcic:app:{app-p}:status",
                    "room:far",
                    f'{{"s":{now - 3 * DAY},"e":2.5340230079999e+14}}',
                )
                checks = [
                    pb.Check(enter_classroom=pb.CanEnterClassroomRequest(app_id=a, room_id="r"))
                    for a in apps[:999]
                ]
                checks.append(
                    pb.Check(
                        enter_classroom=pb.CanEnterClassroomRequest(app_id="app-p", room_id="far")
                    )
                )
                single = pb.CanEnterClassroomRequest(app_id="app-p", room_id="far")
                outcome = ""
                for _ in range(3):  # the first read fills the cache with the room
                    try:
                        d = (await stub.CanEnterClassroom(single, timeout=5)).decision
                        outcome = f"{pb.DecisionReason.Name(d.reason)}"
                    except grpc.aio.AioRpcError as exc:
                        outcome = f"RPC failed: {exc.code().name}"
                    await asyncio.sleep(0.05)
                try:
                    resp = await stub.CheckBatch(pb.CheckBatchRequest(checks=checks), timeout=10)
                    batch = f"{len(resp.decisions)} answers, poisoned item " + (
                        pb.DecisionReason.Name(resp.decisions[-1].reason)
                    )
                except grpc.aio.AioRpcError as exc:
                    batch = f"the whole batch failed: {exc.code().name}"
                print(f"7. a room with a scheduled end in 9999: enter check {outcome}; {batch}")
                # 8. a time-driven transition on a watch stream
                flip = wall_clock() + 2000
                grace = Segment(flip - DAY, (Reason.OVERDUE_GRACE,), grace_ends_at=flip)
                susp = Segment(
                    flip,
                    (Reason.ACCOUNT_OVERDUE,),
                    grace_ends_at=flip,
                    suspended_at=flip,
                    release_at=flip + 60 * DAY,
                )
                await announce(
                    store, AppStatus("app-t", "acct-t", (Segment(0), grace, susp), 1, wall_clock())
                )
                watch = stub.WatchApplicationStatus(
                    pb.WatchApplicationStatusRequest(app_ids=["app-t"])
                )
                seen = []
                end = time.monotonic() + 4
                with contextlib.suppress(TimeoutError):
                    while time.monotonic() < end:
                        msg = await asyncio.wait_for(watch.read(), end - time.monotonic())
                        if msg.HasField("status"):
                            state = pb.ApplicationState.Name(msg.status.state)
                            seen.append(f"{state} at {wall_clock() - flip:+d} ms")
                watch.cancel()
                print(f"8. watch around a grace end (instant = 0 ms): {seen}")
            # 6. connections that never send the preface
            socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(200)]
            await asyncio.sleep(15)
            still = 0
            for sock in socks:
                sock.setblocking(False)
                try:
                    while sock.recv(4096):
                        pass
                except BlockingIOError:
                    still += 1  # nothing to read and not closed
                except OSError:
                    pass
                sock.close()
            print(
                f"6. raw TCP connections with no HTTP/2 preface still open after 15 s: {still}/200"
            )
        finally:
            stopped(proc)
            await store.close()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    asyncio.run(main())
