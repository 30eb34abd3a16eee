"""How records are stored: the status timeline's compact segment codec, the
status row and classroom report decoding, and text/bytes decoding.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Final

from lcic_guard.domain.policy import AppStatus, Reason, Room, Segment
from lcic_guard.domain.rooms import reported_room
from lcic_guard.domain.time import Millis
from lcic_guard.store.keys import ROOM_FIELD_PREFIX

# ---------------------------------------------------------------------------
# Codec of the status timeline (compact: it is what every check decodes).

_REASON_BY_NAME: Final = {r.value: r for r in Reason}


def encode_segments(segments: Sequence[Segment]) -> str:
    # effective_at (R6) is written only where it differs from suspended_at
    # (a late fact), so the common record keeps its five fields.
    return json.dumps(
        [
            [
                s.starts_at,
                [r.value for r in s.reasons],
                s.grace_ends_at,
                s.suspended_at,
                s.release_at,
            ]
            + ([s.effective_at] if s.effective_at != s.suspended_at else [])
            for s in segments
        ],
        separators=(",", ":"),
    )


def decode_segments(data: str | bytes) -> tuple[Segment, ...]:
    out = []
    for start, reasons, grace, susp, release, *rest in json.loads(data):
        out.append(
            Segment(
                start,
                tuple(_REASON_BY_NAME[r] for r in reasons),
                grace,
                susp,
                release,
                rest[0] if rest else susp,
            )
        )
    return tuple(out)


def decode_status(app_id: str, fields: Sequence[Any]) -> AppStatus | None:
    """Decode ``HMGET version data account updated_at`` into a status."""
    version, data, account, updated = fields[:4]
    if data is None:
        return None
    return AppStatus(
        app_id=app_id,
        account_id=text(account) or "",
        segments=decode_segments(data),
        version=int(version or 0),
        updated_at=int(updated or 0),
    )


def _stored_millis(value: Any) -> Millis | None:
    """A stored time as int ms. Lua's cjson writes numbers >= 1e14 as floats;
    a value that is not a number at all is a corrupt record."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"stored time is not a number: {value!r:.40}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("stored time is not finite")
    return int(value)


def decode_room(raw: str | bytes | None) -> Room | None:
    if raw is None:
        return None
    obj = json.loads(raw)
    if not isinstance(obj, dict):
        raise ValueError("stored room is not an object")
    return reported_room(
        _stored_millis(obj.get("s")), _stored_millis(obj.get("e")), _stored_millis(obj.get("x"))
    )


_STATUS_FIELDS: Final = ("version", "data", "account", "updated_at")


def check_fields(room_id: str | None) -> list[str]:
    """The status hash fields a check reads (what decode_status expects)."""
    return [*_STATUS_FIELDS, ROOM_FIELD_PREFIX + room_id] if room_id else list(_STATUS_FIELDS)


def decode_check_fields(
    app_id: str, room_id: str | None, values: Sequence[Any]
) -> tuple[AppStatus | None, Room | None]:
    """The status and, when ``room_id`` was asked, its reported room, from
    the values of :func:`check_fields` in that order."""
    status = decode_status(app_id, values)
    room = decode_room(values[4]) if room_id and status is not None else None
    return status, room


def text(value: str | bytes | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return value.decode()
