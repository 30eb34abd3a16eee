"""Time on the wire and in the store: integer milliseconds since the Unix
epoch, UTC, and their RFC 3339 text form.

Pure: no I/O except :func:`wall_clock`, the one place the processes read the
system clock (tests pass their own clock instead).
"""

from __future__ import annotations

import re
import time
from datetime import UTC, date, datetime, timedelta
from typing import Final

Millis = int
"""Milliseconds since the Unix epoch, UTC."""


# Outside this window a timestamp is a bug upstream, not a fact. The last
# year is 9998 so that any offset or rounding applied to a stored time still
# formats as a four-digit year (what every reader of RFC 3339 expects).
MIN_TIME: Final[Millis] = 0
MAX_TIME: Final[Millis] = 253370764799999  # 9998-12-31T23:59:59.999Z
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_DAY: Final = date(1970, 1, 1).toordinal()
# RFC 3339 §5.6 date-time: "T" and "Z" are case-insensitive there, and a
# space between date and time is allowed by its note on readability.
_RFC3339: Final = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))?",
    re.ASCII,
)


class InvalidTime(ValueError):
    """A timestamp that is not RFC 3339 in the years 1970-9998; ``reason``
    names the field (a billing event refuses it as an ``InvalidEvent``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def wall_clock() -> Millis:
    return time.time_ns() // 1_000_000


def parse_time(value: object, field: str) -> Millis:
    """Parse an RFC 3339 date-time into UTC milliseconds (years 1970-9998).

    Strict: a full date and time with seconds and an offset (``Z``, ``z`` or
    ``+hh:mm``); fractions past the millisecond are truncated. A leap second
    (``:60``) counts as the minute's last millisecond, which keeps order.
    Other ISO 8601 forms (week dates, basic format, no seconds) are refused.
    """
    if not isinstance(value, str):
        raise InvalidTime(f"{field}: expected an RFC 3339 timestamp string")
    m = _RFC3339.fullmatch(value)
    if m is None:
        raise InvalidTime(f"{field}: not an RFC 3339 timestamp: {value[:40]!r}")
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    frac, zulu, sign, off_h, off_m = m.group(7, 8, 9, 10, 11)
    if zulu is None and sign is None:
        raise InvalidTime(f"{field}: timestamp has no time zone (use Z for UTC)")
    try:
        day_number = date(year, month, day).toordinal() - _EPOCH_DAY
    except ValueError:
        raise InvalidTime(f"{field}: not an RFC 3339 timestamp: {value[:40]!r}") from None
    offset = 0
    if sign is not None:
        if int(off_h) > 23 or int(off_m) > 59:
            raise InvalidTime(f"{field}: not an RFC 3339 timestamp: {value[:40]!r}")
        offset = (int(off_h) * 60 + int(off_m)) * (1 if sign == "+" else -1)
    if hour > 23 or minute > 59 or second > 60:
        raise InvalidTime(f"{field}: not an RFC 3339 timestamp: {value[:40]!r}")
    millis = int((frac or "0")[:3].ljust(3, "0"))
    if second == 60:
        second, millis = 59, 999
    ms = ((day_number * 24 + hour) * 60 + minute - offset) * 60_000 + second * 1000 + millis
    if not MIN_TIME <= ms <= MAX_TIME:
        raise InvalidTime(f"{field}: timestamp out of range (years 1970-9998, UTC)")
    return ms


def format_time(ms: Millis) -> str:
    """Format UTC milliseconds as RFC 3339 with a Z suffix."""
    dt = _EPOCH + timedelta(milliseconds=ms)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def describe_time(ms: Millis | None) -> str:
    """A time for a message to a person; None is said as such."""
    return format_time(ms) if ms is not None else "an unknown time"
