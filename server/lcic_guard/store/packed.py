"""The packed status record: what the sidecar's cache holds per application
and what a feed shard's snapshot stores, so that loading the table is
copying bytes, not decoding JSON.
"""

from __future__ import annotations

import struct
from typing import Final

from lcic_guard.domain.policy import SUSPENSION_PRECEDENCE, AppStatus, Reason, Segment
from lcic_guard.domain.time import Millis

# One packed record per application, so a million cached apps cost a few
# hundred bytes each and nothing for the garbage collector to walk:
# header (version, fetched_at, known, segment count, feed shard), then per segment its
# start, reasons as bits, which optional times follow, and those times
# (grace end, suspension start, release, and the suspension's effective time
# only where it differs from its start).
HEAD: Final = struct.Struct("<qqBBB")
_SEG: Final = struct.Struct("<qHB")  # starts_at, reason bits, optional-time flags
_TIME: Final = struct.Struct("<q")
_REASON_BITS: Final = {r: 1 << i for i, r in enumerate(Reason)}
# Segments list reasons in R9 order with OVERDUE_GRACE last.
_CANONICAL: Final = (*SUSPENSION_PRECEDENCE, Reason.OVERDUE_GRACE)
_reasons_of_bits: dict[int, tuple[Reason, ...]] = {}
_SIZE_OF_FLAGS: Final = tuple(_SEG.size + _TIME.size * bin(f).count("1") for f in range(16))


def _bits(reasons: tuple[Reason, ...]) -> int:
    out = 0
    for r in reasons:
        out |= _REASON_BITS[r]
    return out


def _reasons(bits: int) -> tuple[Reason, ...]:
    reasons = _reasons_of_bits.get(bits)
    if reasons is None:
        reasons = tuple(r for r in _CANONICAL if bits & _REASON_BITS[r])
        _reasons_of_bits[bits] = reasons
    return reasons


def pack(status: AppStatus | None, fetched_at: Millis, shard: int) -> bytes:
    if status is None:
        return HEAD.pack(0, fetched_at, 0, 0, shard)
    parts = [HEAD.pack(status.version, fetched_at, 1, len(status.segments), shard)]
    for seg in status.segments:
        effective = seg.effective_at if seg.effective_at != seg.suspended_at else None
        times = (seg.grace_ends_at, seg.suspended_at, seg.release_at, effective)
        flags = sum(1 << i for i, t in enumerate(times) if t is not None)
        parts.append(_SEG.pack(seg.starts_at, _bits(seg.reasons), flags))
        parts += [_TIME.pack(t) for t in times if t is not None]
    return b"".join(parts)


def unpack_segment(rec: bytes, offset: int) -> Segment:
    start, bits, flags = _SEG.unpack_from(rec, offset)
    pos = offset + _SEG.size
    times: list[Millis | None] = []
    for i in range(4):
        if flags & (1 << i):
            times.append(_TIME.unpack_from(rec, pos)[0])
            pos += _TIME.size
        else:
            times.append(None)
    effective = times[1] if times[3] is None else times[3]
    return Segment(start, _reasons(bits), times[0], times[1], times[2], effective)


def segment_span(rec: bytes, count: int, now: Millis) -> tuple[int, int]:
    """Where the segment in force at ``now`` lies in a packed record."""
    offset = HEAD.size
    span = (offset, offset + _SIZE_OF_FLAGS[rec[offset + 10]])
    for _ in range(1, count):
        offset = span[1]
        if _TIME.unpack_from(rec, offset)[0] > now:
            break
        span = (offset, offset + _SIZE_OF_FLAGS[rec[offset + 10]])
    return span


def _spans(rec: bytes, count: int) -> list[int]:
    offsets, offset = [], HEAD.size
    for _ in range(count):
        offsets.append(offset)
        offset += _SIZE_OF_FLAGS[rec[offset + 10]]
    return offsets


def unpack(app_id: str, rec: bytes) -> tuple[AppStatus | None, Millis]:
    version, fetched_at, known, count, _ = HEAD.unpack_from(rec)
    if not known:
        return None, fetched_at
    segments = tuple(unpack_segment(rec, offset) for offset in _spans(rec, count))
    # The account is not kept in the cache: no decision depends on it.
    return AppStatus(app_id, "", segments, version), fetched_at


def segment_of(data: bytes) -> Segment:
    """Decode the segment in force from what :meth:`StatusCache.in_force`
    returned."""
    return unpack_segment(data, 0)


def timeline_of(data: bytes) -> tuple[Segment, ...]:
    """Decode what :meth:`StatusCache.in_force` returned: the segment in
    force and every one after it."""
    out, offset = [], 0
    while offset < len(data):
        out.append(unpack_segment(data, offset))
        offset += _SIZE_OF_FLAGS[data[offset + 10]]
    return tuple(out)


def segment_starts(rec: bytes) -> list[Millis]:
    """When each segment of a packed record starts (none for an unknown app)."""
    _, _, known, count, _ = HEAD.unpack_from(rec)
    if not known:
        return []
    return [_SEG.unpack_from(rec, offset)[0] for offset in _spans(rec, count)]
