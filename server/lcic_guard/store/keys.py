"""Every Redis key and stream name lcic-guard uses, in one place (see the key
table in docs/design.md). Keys of one account or one application share a
hash slot (the ``{...}`` tag), so that each Lua script runs on a Redis Cluster.
"""

from __future__ import annotations

import hashlib
import zlib
from typing import Final

from lcic_guard.domain.facts import (
    Fact,
    to_json,
)

BILLING_STREAM: Final = "lcic:billing:events"
GUARD_STREAM: Final = "lcic:guard:events"
DEAD_LETTER_STREAM: Final = "lcic:guard:deadletter"
# The status table and its change feed are split into this many feed shards
# by a stable hash of the application id. A shard is one hash slot: its
# applications' status keys, its feed stream, its sequence counter and its
# packed snapshot, so that a status write, its snapshot entry and its feed
# entry are one script (atomic, and runnable on Redis Cluster). Changing the
# number moves every key: it is part of the data layout, not a setting.
FEED_SHARDS: Final = 16
# Each shard's packed snapshot is split into this many hashes, so that no key
# grows past a few hundred kB even at a million applications.
SNAPSHOT_CHUNKS: Final = 64
# Each shard's feed keeps about this many entries; a sidecar that falls
# further behind sees a gap in the sequence and reloads that shard.
FEED_MAXLEN: Final = 20_000
# Default bound of the dead-letter stream (approximate MAXLEN).
DEADLETTER_MAXLEN: Final = 100_000
# An event longer than this is dead-lettered without being parsed.
MAX_EVENT_BYTES: Final = 65_536
# What is kept of such an event in its dead letter.
OVERSIZED_KEEP: Final = 4_096
EVENT_INDEX_BUCKETS: Final = 1024
# Release deadlines (R10): one sorted set, worked only by the holder of the
# leader lease, whose fencing token a release needs (ADR 0033). A member of
# another kind found here was written by an earlier version, which kept
# every deadline in this one set: it is moved to its shard.
DEADLINES: Final = "lcic:guard:deadlines"
# Every other deadline (app, notice, warn) lives in one of this many sorted
# sets, each worked under a lease of its own, so that replicas share the
# work and a backlog in one shard does not hold up the others. Changing it
# strands the members of the shards that disappear: it is fixed.
DEADLINE_SHARDS: Final = 16
# The reconcilers alive now (name -> until when, Redis's clock), so that
# each takes its fair share of the deadline shards.
REPLICAS: Final = "lcic:guard:replicas"
HEARTBEAT: Final = "lcic:guard:heartbeat"
# A random id naming the data set Redis holds: created when a process first
# finds none (a new table, or one emptied by FLUSHALL or a restart without
# data, before a snapshot is loaded again). A different id means whatever a
# process holds from Redis describes data that is gone.
GENERATION: Final = "lcic:guard:generation"
STATUS_PATTERN: Final = "lcic:app:{f*}:*:status"
# Set once the keys of the layout before feed shards have been carried over.
LAYOUT: Final = "lcic:guard:layout"
# Status and parked keys of the layout before feed shards (``{APP}`` tag).
LEGACY_APP_PATTERN: Final = "lcic:app:{*}:*"
# What the reconciler last saw of the store (run ids, generation, stream
# tops), to tell that it went back in time (R10).
CONTINUITY: Final = "lcic:guard:{continuity}"
# Releases paused after a store discontinuity: since when, and why (R10).
RELEASE_PAUSE: Final = "lcic:guard:{continuity}:release-pause"


def feed_shard(app_id: str) -> int:
    """The feed shard of an application: a stable hash every process agrees on."""
    return zlib.crc32(app_id.encode()) % FEED_SHARDS


def _shard_tag(shard: int) -> str:
    return f"{{f{shard:02d}}}"


def status_key(app_id: str) -> str:
    return f"lcic:app:{_shard_tag(feed_shard(app_id))}:{app_id}:status"


def parked_key(app_id: str) -> str:
    return f"lcic:app:{_shard_tag(feed_shard(app_id))}:{app_id}:parked"


def feed_key(shard: int) -> str:
    """A feed shard's stream: every status write and room report of its
    applications, and the reconciler's progress marks, each with its
    shard sequence number."""
    return f"lcic:feed:{_shard_tag(shard)}"


def feed_seq_key(shard: int) -> str:
    """A feed shard's sequence: the number of the last entry that changed something."""
    return f"lcic:feed:{_shard_tag(shard)}:seq"


def snapshot_key(shard: int, chunk: int) -> str:
    """One chunk of a feed shard's packed snapshot: app id -> packed status."""
    return f"lcic:snap:{_shard_tag(shard)}:{chunk:02d}"


def snapshot_key_of(app_id: str) -> str:
    crc = zlib.crc32(app_id.encode())
    return snapshot_key(crc % FEED_SHARDS, (crc // FEED_SHARDS) % SNAPSHOT_CHUNKS)


def legacy_app_key(app_id: str, kind: str) -> str:
    """An application's ``status`` or ``parked`` key in the layout before feed shards."""
    return f"lcic:app:{{{app_id}}}:{kind}"


def facts_key(account_id: str) -> str:
    return f"lcic:acct:{{{account_id}}}:facts"


def meta_key(account_id: str) -> str:
    return f"lcic:acct:{{{account_id}}}:meta"


def recorded_key(account_id: str) -> str:
    return f"lcic:acct:{{{account_id}}}:recorded"


def ledger_key(account_id: str) -> str:
    """The account's announcement ledger: announcement id -> its record
    (claimed, then committed once on the stream)."""
    return f"lcic:acct:{{{account_id}}}:ledger"


def event_index_key(event_id: str) -> str:
    """The index bucket of an event id: a stable hash, so every process
    picks the same bucket, and the bucket is the hash tag (one slot)."""
    bucket = zlib.crc32(event_id.encode()) % EVENT_INDEX_BUCKETS
    return f"lcic:evt:{{{bucket:04d}}}"


def event_digest(fact: Fact) -> str:
    """What the index keeps of an event's content: enough to tell a repeat
    from a reuse of the id (128 bits of SHA-256 of its canonical JSON)."""
    return hashlib.sha256(to_json(fact).encode()).hexdigest()[:32]


ROOM_FIELD_PREFIX: Final = "room:"


_SHARDED_PREFIX_LEN: Final = len("lcic:app:{f00}:")


def status_key_app(key: str | bytes) -> str | None:
    """The application id of a status key, None for any other key."""
    name = key.decode() if isinstance(key, bytes) else key
    if not (name.startswith("lcic:app:{f") and name.endswith(":status")):
        return None
    app_id = name[_SHARDED_PREFIX_LEN : -len(":status")]
    return app_id if app_id and status_key(app_id) == name else None


def legacy_app_key_parts(key: str | bytes) -> tuple[str, str] | None:
    """``(app id, kind)`` of a key of the layout before feed shards, else None."""
    name = key.decode() if isinstance(key, bytes) else key
    if not name.startswith("lcic:app:{"):
        return None
    for kind in ("status", "parked"):
        suffix = "}:" + kind
        if name.endswith(suffix):
            app_id = name[len("lcic:app:{") : -len(suffix)]
            if app_id and legacy_app_key(app_id, kind) == name and "}" not in app_id:
                return app_id, kind
    return None


LEADER: Final = "lcic:guard:{leader}"
FENCE: Final = "lcic:guard:{leader}:fence"


def deadline_shard(member: str) -> int:
    """The shard of a deadline member: a stable hash (the same in every
    process and version), so a member is always in one place."""
    return zlib.crc32(member.encode()) % DEADLINE_SHARDS


def shard_deadlines(shard: int) -> str:
    """The sorted set of one deadline shard; its number is the hash tag, so
    the shard, its lease and its lease counter share a slot."""
    return f"lcic:guard:deadlines:{{d{shard:02d}}}"


def shard_rechecks(shard: int) -> str:
    """The sorted set of one shard's re-checks: an application to look at
    again because a state waits to settle or an announcement is in flight.
    Kept apart from the shard's transitions, so that a transition just due
    is not crowded out by the re-checks of a burst noted seconds earlier."""
    return f"{shard_deadlines(shard)}:settle"


def shard_lease(shard: int) -> str:
    """The lease under which one replica works a deadline shard."""
    return f"{shard_deadlines(shard)}:lease"


def shard_fence(shard: int) -> str:
    """The counter of a shard's lease: each new holder's token is higher."""
    return f"{shard_deadlines(shard)}:fence"


def deadline_key(member: str) -> str:
    """The sorted set holding a deadline member: a release's is the single
    set of the leader, any other kind's its shard."""
    if deadline_of(member)[0] == "release":
        return DEADLINES
    return shard_deadlines(deadline_shard(member))


def recheck_key(member: str) -> str:
    """The re-check set of an application deadline's shard."""
    return shard_rechecks(deadline_shard(member))


# Deadline members: what is due, and for whom.
def app_deadline(app_id: str) -> str:
    """An application's next transition or settle time."""
    return f"app:{app_id}"


def release_deadline(account_id: str) -> str:
    """An account's release (R10) falling due."""
    return f"release:{account_id}"


def notice_deadline(account_id: str) -> str:
    """An account's next release notice."""
    return f"notice:{account_id}"


def warning_deadline(account_id: str) -> str:
    """An account's next warning (suspension_scheduled, override_applied)."""
    return f"warn:{account_id}"


def deadline_of(member: str) -> tuple[str, str]:
    """``(kind, id)`` of a DEADLINES member: kind ``app``, ``release``,
    ``notice`` or ``warn``."""
    kind, _, ident = member.partition(":")
    return kind, ident
