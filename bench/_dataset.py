"""Benchmark data: application statuses written straight into the status table.

The statuses are the policy's own: one small account per situation (active,
grace, quota exhausted, overdue, expired) is folded with
:func:`lcic_guard.domain.policy.compute_account`, and every benchmark application
gets the timeline of one of these templates under its own application and
account id. The hashes are written with the exact fields
:meth:`lcic_guard.store.status.Store.write_status` writes (``version``, ``data`` from
:func:`lcic_guard.store.status.encode_segments`, ``account``, ``updated_at``), and
each app's packed snapshot entry, as raw ``HSET`` commands streamed in the
Redis protocol over one socket (Redis "mass insertion"): a few seconds per
million applications on this kind of machine, against minutes through a
Python client.
"""

from __future__ import annotations

import socket
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from lcic_guard.domain.facts import (
    ApplicationRegistered,
    Fact,
    OverdueAlert,
    PackagePurchased,
    PackageUsage,
)
from lcic_guard.domain.policy import DAY, HOUR, AppStatus, PolicyConfig, compute_account
from lcic_guard.domain.time import Millis
from lcic_guard.store.codec import decode_segments, encode_segments
from lcic_guard.store.keys import FEED_SHARDS, LAYOUT, SNAPSHOT_CHUNKS, status_key
from lcic_guard.store.packed import pack

# Every TEMPLATE_CYCLE consecutive applications: mostly in good standing, one
# of each other situation (the decisions a sidecar really gives).
TEMPLATE_CYCLE = 20
_ACTIVE_SHARE = 16


def app_id(n: int) -> str:
    return f"app-{n:07d}"


def account_id(n: int) -> str:
    return f"acct-{n:07d}"


@dataclass(frozen=True, slots=True)
class Template:
    name: str
    data: bytes  # encode_segments() of the timeline
    version: int


def _facts(kind: str, now: Millis) -> list[Fact]:
    acct, app, pkg = "acct-t", "app-t", "pkg-t"
    registered = now - 10 * DAY
    out: list[Fact] = [
        ApplicationRegistered("t-1", registered, account_id=acct, app_id=app),
    ]
    starts, expires = registered, now + 20 * DAY
    if kind == "expired":
        expires = now - DAY
    out.append(PackagePurchased("t-2", registered, app, pkg, starts, expires, 6000))
    used = 6000 if kind == "quota" else 1200
    out.append(PackageUsage("t-3", now - HOUR, app_id=app, package_id=pkg, used_minutes=used))
    if kind == "grace":
        out.append(OverdueAlert("t-4", now - 2 * HOUR, account_id=acct))
    elif kind == "overdue":
        out.append(OverdueAlert("t-4", now - 3 * DAY, account_id=acct))
    return out


def templates(now: Millis, policy: PolicyConfig | None = None) -> list[Template]:
    """The TEMPLATE_CYCLE templates, in the order applications cycle through."""
    policy = policy or PolicyConfig()
    made: dict[str, Template] = {}
    for kind in ("active", "grace", "quota", "overdue", "expired"):
        status: AppStatus = compute_account(_facts(kind, now), policy)["app-t"]
        made[kind] = Template(kind, encode_segments(status.segments).encode(), 1)
    cycle = [made["active"]] * _ACTIVE_SHARE
    cycle += [made["grace"], made["quota"], made["overdue"], made["expired"]]
    assert len(cycle) == TEMPLATE_CYCLE
    return cycle


def _resp(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(p), p))
    return b"".join(out)


def _packed(t: Template, shard: int) -> bytes:
    """The packed record the snapshot holds for an app of this template."""
    status = AppStatus("", "", decode_segments(t.data), t.version)
    return pack(status, 0, shard)


def hset_commands(first: int, count: int, now: Millis) -> Iterator[tuple[int, bytes]]:
    """(number of commands, RESP bytes) chunks writing apps [first, first+count):
    each app's status hash and its entry in its feed shard's packed snapshot
    (the fields and keys lua/write_status.lua writes; the feed itself starts
    empty, at number 0, as a table carried over from an earlier layout)."""
    updated = str(now).encode()
    cycle = templates(now)
    packed = [[_packed(t, shard) for shard in range(FEED_SHARDS)] for t in cycle]
    chunk = 10_000
    for start in range(first, first + count, chunk):
        end = min(start + chunk, first + count)
        parts = []
        for n in range(start, end):
            app = b"app-%07d" % n
            crc = zlib.crc32(app)
            shard = crc % FEED_SHARDS
            t = n % TEMPLATE_CYCLE
            template = cycle[t]
            parts.append(
                _resp(
                    b"HSET",
                    b"lcic:app:{f%02d}:%s:status" % (shard, app),
                    b"version",
                    b"%d" % template.version,
                    b"data",
                    template.data,
                    b"account",
                    b"acct-%07d" % n,
                    b"updated_at",
                    updated,
                )
            )
            parts.append(
                _resp(
                    b"HSET",
                    b"lcic:snap:{f%02d}:%02d" % (shard, (crc // FEED_SHARDS) % SNAPSHOT_CHUNKS),
                    app,
                    app + b"\0" + packed[t][shard],
                )
            )
        yield 2 * (end - start), b"".join(parts)


def load_apps(host: str, port: int, first: int, count: int, now: Millis) -> None:
    """Write the statuses of apps [first, first+count) into Redis at host:port.

    One thread streams the commands while this one counts the replies (every
    reply to HSET is an integer line; anything else is an error).
    """
    if count >= 10**7 or first + count > 10**7:
        raise ValueError("application numbers have 7 digits")
    commands = 2 * count + 1
    with socket.create_connection((host, port)) as sock:
        # Written in the feed-shard layout: nothing for a reconciler to carry over.
        sock.sendall(_resp(b"SET", LAYOUT.encode(), b"feed-shards"))
        failure: list[BaseException] = []

        def send() -> None:
            try:
                for _, payload in hset_commands(first, count, now):
                    sock.sendall(payload)
            except BaseException as exc:  # reported by the reading side
                failure.append(exc)
                sock.shutdown(socket.SHUT_RDWR)

        sender = threading.Thread(target=send, name="bench-load", daemon=True)
        sender.start()
        seen = 0
        tail = b""
        while seen < commands:
            data = sock.recv(1 << 20)
            if not data:
                raise RuntimeError(f"redis closed the connection: {failure}")
            if b"-" in data:
                raise RuntimeError(f"HSET failed: {data[data.index(b'-') :][:200]!r}")
            data = tail + data
            seen += data.count(b"\r\n")
            tail = data[data.rindex(b"\n") + 1 :] if b"\n" in data else data
        sender.join()
        if failure:
            raise RuntimeError(f"sending failed: {failure[0]}")


# Of every TEMPLATE_CYCLE apps, the one whose package quota ran out an hour
# before the data was written: a suspension that took effect after the
# classes below started, so their rooms are protected (R6).
QUOTA_SLOT = _ACTIVE_SHARE + 1


def room_id(n: int) -> str:
    return f"room-{n:07d}"


def protected_rooms(apps: int) -> list[tuple[str, str]]:
    """(app, room) of a class in progress on every quota-exhausted app."""
    return [(app_id(n), room_id(n)) for n in range(QUOTA_SLOT, apps, TEMPLATE_CYCLE)]


def load_rooms(host: str, port: int, apps: int, now: Millis) -> int:
    """Report a class started 90 minutes ago, ending in an hour, on every
    quota-exhausted app (the fields Store.report_room writes); returns how many."""
    import json

    import redis as sync_redis
    from lcic_guard.store.keys import ROOM_FIELD_PREFIX

    body = json.dumps({"s": now - 90 * 60_000, "e": now + HOUR}, separators=(",", ":"))
    client = sync_redis.Redis(host=host, port=port)
    pairs = protected_rooms(apps)
    with client.pipeline(transaction=False) as pipe:
        for app, room in pairs:
            pipe.hset(status_key(app), ROOM_FIELD_PREFIX + room, body)
        pipe.execute()
    client.close()
    return len(pairs)
