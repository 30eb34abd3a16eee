"""Draw one account's life under the billing policy, for docs/policy.md.

Usage: .venv/bin/python scripts/timeline.py [--png] [--check] [--out DIR]

One part of scripts/generate, which regenerates everything generated.

Writes ``docs/img/account-timeline.svg`` (hand-written SVG, no dependency)
and, with ``--png``, renders ``docs/img/account-timeline.png`` with
``rsvg-convert`` (Debian: ``apt-get install librsvg2-bin``; not a project
requirement). ``--check`` writes nothing and fails if the committed SVG is
not what the policy draws today.

Nothing in the picture is drawn by hand: a scripted billing history is
replayed through :func:`lcic_guard.domain.policy.compute_account` (the status the
reconciler would have written as each fact arrived) and every segment's
colour, reason and answers come from :func:`lcic_guard.domain.policy.decide`, as do
the deadlines on the axis and the protection of the class in progress. A
test compares the committed SVG with a fresh rendering, so the picture
cannot drift from the code.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from xml.sax.saxutils import escape

from lcic_guard.domain.facts import (
    ApplicationRegistered,
    ArrearsSettled,
    Fact,
    GraceExtended,
    OverdueAlert,
    PackagePurchased,
    ReleaseHoldCleared,
    ReleaseHoldSet,
    ResourcesReleased,
)
from lcic_guard.domain.policy import (
    DAY,
    HOUR,
    MINUTE,
    AppStatus,
    Check,
    Decision,
    PolicyConfig,
    Reason,
    Room,
    State,
    compute_account,
    decide,
    overdue_notice,
)
from lcic_guard.domain.time import Millis, parse_time
from lcic_guard.reconciler import ReconcilerConfig
from lcic_guard.reconciler.announce import notice_plan

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "docs" / "img"
NAME = "account-timeline"

# -- the scripted history ------------------------------------------------------

CFG = PolicyConfig()
RELEASE_MARGIN = ReconcilerConfig().release_margin_ms
REMINDERS = ReconcilerConfig().release_reminders_ms
ACCOUNT, APP = "acct-demo", "app-demo"
A: Millis = parse_time("2026-03-02T09:00:00Z", "A")  # the overdue alert
SETTLED_AT = A + 10 * DAY
CLASS = Room(
    started_at=A + 22 * HOUR, scheduled_end=A + 25 * HOUR, ended_at=A + 25 * HOUR + 30 * MINUTE
)
# The lowest lane: the same alert, backfilled (read) on day 58, with a class
# running when it is read.
LEARNED = A + 58 * DAY
LATE_CLASS = Room(
    started_at=LEARNED - 90 * MINUTE,
    scheduled_end=LEARNED + HOUR,
    ended_at=LEARNED + 30 * MINUTE,
)
# The lowest lane: support overrides. At A + 20 h support extends the grace
# to A + 4 d; on day 40 a dispute holds the release, cleared on day 57.
EXTENDED_AT, EXTENDED_UNTIL = A + 20 * HOUR, A + 4 * DAY
HELD_AT, CLEARED_AT = A + 40 * DAY, A + 57 * DAY
VIEW = (A - 12 * HOUR, A + 66 * DAY)
SCAN = (VIEW[0], A + 3 * DAY)  # where decisions are sampled minute by minute
LATE_SCAN = (LEARNED - 3 * HOUR, LEARNED + 3 * HOUR)
# (from, to, pixels): the axis zooms on the classes in progress and on the
# releases; the scale changes at each break (drawn // on the axis).
REGIONS: tuple[tuple[Millis, Millis, int], ...] = (
    (VIEW[0], A + 21 * HOUR, 310),
    (A + 21 * HOUR, A + 27 * HOUR, 160),
    (A + 27 * HOUR, A + 12 * DAY, 120),
    (A + 12 * DAY, LATE_SCAN[0], 60),
    (LATE_SCAN[0], LATE_SCAN[1], 130),
    (LATE_SCAN[1], VIEW[1], 300),
)


def base_history() -> list[Fact]:
    """An app with a package in force all along, and one overdue alert at A."""
    return [
        ApplicationRegistered("e-1", A - 30 * DAY, account_id=ACCOUNT, app_id=APP),
        PackagePurchased(
            "e-2",
            A - 30 * DAY,
            app_id=APP,
            package_id="pkg-1",
            starts_at=A - 30 * DAY,
            expires_at=A + 365 * DAY,
            quota_minutes=6000,
        ),
        OverdueAlert("e-3", A, account_id=ACCOUNT, amount_due="120.50"),
    ]


Recorded = dict[str, Millis]


def recorded(fact: Fact, when: Recorded) -> Millis:
    """When the reconciler stored the fact (live: as it occurred)."""
    return when.get(fact.event_id, fact.occurred_at)


def status_at(facts: Sequence[Fact], t: Millis, when: Recorded | None = None) -> AppStatus:
    """The status the reconciler holds at ``t``: computed from the facts
    recorded by then, on both their clocks."""
    when = when or {}
    known = [f for f in facts if recorded(f, when) <= t]
    return compute_account(known, CFG, now=t, recorded_at=when)[APP]


# -- replaying the policy ------------------------------------------------------


@dataclass(frozen=True)
class Span:
    """A stretch of time with the same answers."""

    start: Millis
    end: Millis
    state: State
    reason: Reason
    create: bool
    recording: bool

    @property
    def answers(self) -> tuple[State, Reason, bool, bool]:
        return (self.state, self.reason, self.create, self.recording)


@dataclass(frozen=True)
class ClassSpan:
    start: Millis
    end: Millis
    reason: Reason


@dataclass(frozen=True)
class Lane:
    title: str
    note: tuple[str, ...]
    spans: tuple[Span, ...]
    markers: tuple[tuple[Millis, str], ...]
    class_spans: tuple[ClassSpan, ...]
    ticks: tuple[tuple[Millis, str], ...]
    class_notes: tuple[str, ...] = ()  # instead of the usual words for the class


def replay(
    facts: Sequence[Fact], when: Recorded | None = None
) -> list[tuple[Millis, Millis, AppStatus]]:
    """(from, to, status) over the view: the status changes when a fact arrives."""
    arrivals = {recorded(f, when or {}) for f in facts}
    cuts = sorted({*VIEW, *(t for t in arrivals if VIEW[0] < t < VIEW[1])})
    return [(lo, hi, status_at(facts, lo, when)) for lo, hi in pairwise(cuts)]


def spans(facts: Sequence[Fact], when: Recorded | None = None) -> list[Span]:
    out: list[Span] = []
    for lo, hi, status in replay(facts, when):
        segs = status.segments
        for i, seg in enumerate(segs):
            seg_end = segs[i + 1].starts_at if i + 1 < len(segs) else hi
            start, end = max(seg.starts_at, lo), min(seg_end, hi)
            if start >= end:
                continue
            create = decide(Check.CREATE_CLASSROOM, status, start, CFG)
            recording = decide(Check.ACCESS_RECORDING, status, start, CFG)
            assert create.state is not None
            answers = (create.state, create.reason, create.allowed, recording.allowed)
            if out and out[-1].answers == answers:
                start = out.pop().start  # the same answers: one span
            out.append(Span(start, end, *answers))
    return out


def decisions(
    facts: Sequence[Fact],
    check: Check,
    room: Room | None,
    when: Recorded | None = None,
    scan: tuple[Millis, Millis] = SCAN,
) -> Iterator[tuple[Millis, Decision]]:
    """The answer to ``check`` every minute of ``scan`` (the first days)."""
    statuses = replay(facts, when)
    for t in range(scan[0], scan[1], MINUTE):
        status = next(st for lo, hi, st in statuses if lo <= t < hi)
        yield t, decide(check, status, t, CFG, room)


def class_spans(
    facts: Sequence[Fact],
    room: Room = CLASS,
    when: Recorded | None = None,
    scan: tuple[Millis, Millis] = SCAN,
) -> list[ClassSpan]:
    """When the class in progress may be entered, and why (R6)."""
    out: list[ClassSpan] = []
    for t, d in decisions(facts, Check.ENTER_CLASSROOM, room, when, scan):
        if t < room.started_at or not d.allowed:
            continue
        if out and out[-1].reason == d.reason and out[-1].end == t:
            out[-1] = ClassSpan(out[-1].start, t + MINUTE, d.reason)
        else:
            out.append(ClassSpan(t, t + MINUTE, d.reason))
    return out


def first(facts: Sequence[Fact], check: Check, reason: Reason) -> Decision:
    for _, d in decisions(facts, check, None):
        if d.reason == reason:
            return d
    raise AssertionError(f"the policy never answered {reason}")


def rel(t: Millis) -> str:
    """A time relative to the alert A, as on the axis."""
    delta = t - A
    if delta == 0:
        return "A"
    sign = "+" if delta > 0 else "\u2212"
    delta = abs(delta)
    days, rest = divmod(delta, DAY)
    hours, rest = divmod(rest, HOUR)
    minutes = rest // MINUTE
    if days >= 2:
        parts = [f"{days} d", f"{hours} h" if hours else ""]
    else:
        parts = [f"{days * 24 + hours} h", f"{minutes} min" if minutes else ""]
    return f"A {sign} " + " ".join(p for p in parts if p)


def lanes() -> tuple[Lane, Lane, Lane, Lane]:
    paid = [*base_history(), ArrearsSettled("e-4", SETTLED_AT, account_id=ACCOUNT)]
    # Never paid: the reconciler releases once the feed is confirmed read
    # past release_at (plus its margin), which the policy itself reports.
    unpaid = base_history()
    overdue = first(unpaid, Check.CREATE_CLASSROOM, Reason.ACCOUNT_OVERDUE)
    grace = first(unpaid, Check.CREATE_CLASSROOM, Reason.OVERDUE_GRACE)
    assert overdue.release_at is not None and grace.grace_ends_at is not None
    released_at = overdue.release_at + RELEASE_MARGIN
    unpaid.append(ResourcesReleased("e-5", released_at, account_id=ACCOUNT))

    # R6: a class that did not start before the suspension cannot start in it.
    refused = decide(
        Check.ENTER_CLASSROOM, status_at(unpaid, grace.grace_ends_at), grace.grace_ends_at, CFG
    )
    assert not refused.allowed, "a class starting in the suspension must be refused"
    common = ((VIEW[0], ""), (A, ""), (grace.grace_ends_at, "grace_ends_at"))
    lane_paid = Lane(
        "Pays on day 10",
        ("arrears_settled", f"at {rel(SETTLED_AT)} (R3)"),
        tuple(spans(paid)),
        ((A, "overdue alert"), (SETTLED_AT, "top-up: arrears_settled")),
        tuple(class_spans(paid)),
        (*common, (SETTLED_AT, "paid (upper lane)")),
    )
    lane_unpaid = Lane(
        "Never pays",
        ("resources released", f"at {rel(released_at)} (R10)"),
        tuple(spans(unpaid)),
        ((A, "overdue alert"), (released_at, "reconciler releases")),
        tuple(class_spans(unpaid)),
        (*common, (overdue.release_at, "release_at, lane 2")),
    )
    return lane_paid, lane_unpaid, backfilled_lane(), overrides_lane()


def overrides_lane() -> Lane:
    """The unpaid alert again, with support's overrides: a grace extension
    moves the suspension and the release; a release hold, once cleared, lets
    the release happen no sooner than the notice period after the clear."""
    support = {"account_id": ACCOUNT, "actor": "support"}
    history = [
        *base_history(),
        GraceExtended("e-6", EXTENDED_AT, until=EXTENDED_UNTIL, reason="transfer", **support),
        ReleaseHoldSet("e-7", HELD_AT, reason="dispute", **support),
        ReleaseHoldCleared("e-8", CLEARED_AT, reason="dispute closed", **support),
    ]
    held = status_at(history, HELD_AT + DAY).at(HELD_AT + DAY)
    assert held.release_at is None, "a hold leaves no release_at"
    overdue = decide(Check.CREATE_CLASSROOM, status_at(history, CLEARED_AT), CLEARED_AT, CFG)
    assert overdue.release_at is not None and overdue.suspended_at == EXTENDED_UNTIL
    assert overdue.release_at >= CLEARED_AT + CFG.release_notice_ms
    released_at = overdue.release_at + RELEASE_MARGIN
    history.append(
        ResourcesReleased("e-9", released_at, account_id=ACCOUNT, release_at=overdue.release_at)
    )
    return Lane(
        "Overrides",
        (
            "support extends the",
            f"grace to {rel(EXTENDED_UNTIL)}, holds",
            f"the release day {(HELD_AT - A) // DAY}-{(CLEARED_AT - A) // DAY};",
            f"released {rel(released_at)}",
        ),
        tuple(spans(history)),
        (
            (A, "overdue alert"),
            (EXTENDED_AT, "grace_extended"),
            (CLEARED_AT, "hold cleared"),
            (released_at, "released"),
        ),
        tuple(class_spans(history)),
        (),
        ("still in the extended grace: allowed, with a warning",),
    )


def backfilled_lane() -> Lane:
    """The unpaid alert again, but read on day 58 (a backfilled history):
    nothing changes before it is read, a class running then carries on (R6),
    and the release comes with notice (R10)."""
    history = base_history()
    when: Recorded = {f.event_id: f.occurred_at for f in history}
    alert = history[-1]
    when[alert.event_id] = LEARNED
    episode = overdue_notice(history, CFG, LEARNED, when)
    assert episode is not None
    _, known, release_at = episode
    notices = notice_plan(known, release_at, REMINDERS)
    released_at = release_at + RELEASE_MARGIN
    history.append(ResourcesReleased("e-5", released_at, account_id=ACCOUNT, release_at=release_at))
    class_ = tuple(class_spans(history, LATE_CLASS, when, LATE_SCAN))
    assert any(c.reason is Reason.IN_PROGRESS_PROTECTED for c in class_), "R6 must protect it"
    reminders = ", ".join(f"{n.kind} before" for n in notices[1:]) or "none"
    assert len(notices) == 2, "the 7 d reminder coincides with the notice; 30 d is past"
    return Lane(
        "Alert read late",
        (
            "alert dated A, read",
            f"at {rel(LEARNED)}: notice;",
            f"reminder {reminders};",
            f"released at {rel(released_at)}",
        ),
        tuple(spans(history, when)),
        ((LEARNED, "alert read: release_scheduled"), (released_at, "released")),
        class_,
        ((LEARNED, "alert read"), (release_at, "release_at, lane 3")),
        (
            "IN_PROGRESS_PROTECTED until it ended (R6):",
            "it started before the alert was read",
        ),
    )


# -- drawing -------------------------------------------------------------------

WIDTH, HEIGHT = 1300, 1060
X0 = 170
LANE_TOP = (130, 330, 530, 730)
BOX_H = 64
FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"
MONO = "DejaVu Sans Mono, Menlo, Consolas, monospace"
FILL = {
    State.ACTIVE: ("#c8e6c9", "#1b5e20"),
    State.GRACE: ("#ffe082", "#6d4c00"),
    State.SUSPENDED: ("#ef9a9a", "#7f0000"),
    State.RELEASED: ("#616161", "#ffffff"),
    State.BANNED: ("#4a148c", "#ffffff"),
}
CLASS_FILL = {
    Reason.OK: "#90caf9",
    Reason.OVERDUE_GRACE: "#90caf9",
    Reason.IN_PROGRESS_PROTECTED: "#1565c0",
}


def x(t: Millis) -> float:
    left = float(X0)
    for lo, hi, width in REGIONS:
        if t <= hi:
            return round(left + width * (max(t, lo) - lo) / (hi - lo), 1)
        left += width
    return left


def text_width(text: str, size: float, family: str = FONT) -> float:
    """A generous estimate of the width of ``text`` (DejaVu's average advance)."""
    return (0.61 if family == MONO else 0.57) * size * len(text)


class Svg:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def add(self, element: str) -> None:
        self.parts.append(element)

    def rect(self, x0: float, y0: float, w: float, h: float, fill: str, extra: str = "") -> None:
        self.add(f'<rect x="{x0:g}" y="{y0:g}" width="{w:g}" height="{h:g}" fill="{fill}"{extra}/>')

    def line(
        self, x1: float, y1: float, x2: float, y2: float, stroke: str, extra: str = ""
    ) -> None:
        self.add(
            f'<line x1="{x1:g}" y1="{y1:g}" x2="{x2:g}" y2="{y2:g}" stroke="{stroke}"{extra}/>'
        )

    def text(
        self,
        x0: float,
        y0: float,
        content: str,
        *,
        size: float = 12,
        fill: str = "#212121",
        anchor: str = "start",
        weight: str = "normal",
        family: str = FONT,
    ) -> None:
        self.add(
            f'<text x="{x0:g}" y="{y0:g}" font-family="{family}" font-size="{size:g}" '
            f'fill="{fill}" text-anchor="{anchor}" font-weight="{weight}">{escape(content)}</text>'
        )

    def render(self) -> str:
        head = (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}">'
        )
        return "\n".join([head, *self.parts, "</svg>", ""])


def mark(ok: bool) -> str:
    return "\u2713" if ok else "\u2717"


def draw_lane(svg: Svg, lane: Lane, top: int) -> None:
    svg.text(24, top + 24, lane.title, size=15, weight="bold")
    for n, line in enumerate(lane.note):
        svg.text(24, top + 42 + 14 * n, line, size=11, fill="#555555")
    for span in lane.spans:
        x0, x1 = x(span.start), x(span.end)
        fill, ink = FILL[span.state]
        svg.rect(x0, top, x1 - x0, BOX_H, fill, ' stroke="#ffffff" stroke-width="1"')
        lines = [
            (span.state.value, 13, "bold", FONT),
            (span.reason.value, 10.5, "normal", MONO),
            (f"{mark(span.create)} create  {mark(span.recording)} recording", 11, "normal", FONT),
        ]
        for n, (content, size, weight, family) in enumerate(lines):
            if text_width(content, size, family) + 12 > x1 - x0:
                break
            svg.text(
                x0 + 7,
                top + 19 + 18 * n,
                content,
                size=size,
                fill=ink,
                weight=weight,
                family=family,
            )
    for t, label in lane.markers:
        mx = x(t)
        svg.add(
            f'<path d="M{mx - 6:g},{top - 12} L{mx + 6:g},{top - 12} L{mx:g},{top - 2} Z" '
            'fill="#37474f"/>'
        )
        svg.text(mx, top - 17, label, size=11.5, anchor="middle", fill="#37474f")
    # The class in progress: running, then protected through the suspension.
    row = top + BOX_H + 10
    for cs in lane.class_spans:
        svg.rect(x(cs.start), row, x(cs.end) - x(cs.start), 18, CLASS_FILL[cs.reason], ' rx="3"')
    if lane.class_spans:
        first, last = lane.class_spans[0], lane.class_spans[-1]
        svg.text(
            x(first.start) - 6,
            row + 13,
            f"class starts {rel(first.start)}",
            size=11,
            anchor="end",
            fill="#0d47a1",
        )
        protected = [c for c in lane.class_spans if c.reason is Reason.IN_PROGRESS_PROTECTED]
        notes = [f"enterable until it is reported ended at {rel(last.end)}"]
        if protected:
            notes = [
                f"IN_PROGRESS_PROTECTED until reported ended at {rel(last.end)} (R6)",
                "a class not started before the suspension cannot start",
            ]
        notes = list(lane.class_notes) or notes
        for n, note in enumerate(notes):
            svg.text(x(last.end) + 6, row + 13 + 15 * n, note, size=11, fill="#0d47a1")


def draw_axis(svg: Svg, ticks: Sequence[tuple[Millis, str]]) -> None:
    y0 = LANE_TOP[-1] + BOX_H + 60
    right = x(VIEW[1])
    svg.line(X0, y0, right, y0, "#424242", ' stroke-width="1.5"')
    for t, caption in sorted(set(ticks)):
        tx = x(t)
        svg.line(tx, LANE_TOP[0] - 8, tx, y0, "#9e9e9e", ' stroke-dasharray="3,4"')
        svg.line(tx, y0, tx, y0 + 6, "#424242")
        svg.text(tx, y0 + 21, rel(t), size=11.5, anchor="middle", weight="bold")
        svg.text(tx, y0 + 36, caption, size=10.5, anchor="middle", fill="#616161")
    for _, hi, _ in REGIONS[:-1]:
        bx = x(hi)
        svg.rect(bx - 4, y0 - 7, 8, 14, "#ffffff")
        for dx in (-4, 2):
            svg.line(bx + dx - 3, y0 + 7, bx + dx + 3, y0 - 7, "#424242", ' stroke-width="1.5"')
    svg.text(
        right,
        y0 + 56,
        "the time scale changes at each // on the axis",
        size=10.5,
        anchor="end",
        fill="#757575",
    )


def draw_legend(svg: Svg) -> None:
    y0 = HEIGHT - 116
    items = [
        (FILL[State.ACTIVE][0], "ACTIVE"),
        (FILL[State.GRACE][0], "GRACE: answered as ACTIVE, with a warning"),
        (FILL[State.SUSPENDED][0], "SUSPENDED: denied, service restorable"),
        (FILL[State.RELEASED][0], "RELEASED: denied for good"),
        (CLASS_FILL[Reason.OK], "class running"),
        (CLASS_FILL[Reason.IN_PROGRESS_PROTECTED], "class protected"),
    ]
    cx = 24.0
    for fill, label in items:
        svg.rect(cx, y0, 16, 16, fill, ' rx="2"')
        svg.text(cx + 22, y0 + 12.5, label, size=11.5)
        cx += 22 + text_width(label, 11.5) + 26
    grace = f"{CFG.grace_ms // HOUR} h"
    notes = (
        f"A = the first overdue alert after the last settlement. Grace: {grace} (R1); unpaid, "
        f"every app of the account is suspended at A + {grace} (R2).",
        f"Release: after {CFG.release_after_ms // DAY} days of overdue suspension (R10), by the "
        f"reconciler once the billing feed is read {RELEASE_MARGIN // MINUTE} min past release_at. "
        f"A class in progress is protected until scheduled end + {CFG.overrun_ms // MINUTE} min "
        "at most (R6).",
        f"A late fact is read at its own time: the release comes no sooner than "
        f"{CFG.release_notice_ms // DAY} d after the overdue is learned, with notice, and a class "
        "running when it is learned carries on (R6, R10).",
        "Support overrides only postpone: an extension moves the suspension and the release; a "
        f"cleared hold releases no sooner than {CFG.release_notice_ms // DAY} d after the clear "
        "is recorded.",
    )
    for n, note in enumerate(notes):
        svg.text(24, y0 + 40 + 16 * n, note, size=11, fill="#424242")


def render() -> str:
    paid, unpaid, late, support = lanes()
    svg = Svg()
    svg.rect(0, 0, WIDTH, HEIGHT, "#ffffff")
    svg.text(
        24,
        36,
        "One account's life under lcic-guard: overdue, grace, suspension, then payment or release",
        size=19,
        weight="bold",
    )
    svg.text(
        24,
        58,
        "Computed by scripts/timeline.py from lcic_guard.domain.policy (compute_account, decide) "
        "on a "
        "scripted billing history; regenerate, do not edit.",
        size=11.5,
        fill="#616161",
    )
    # First: its guides go under the lanes.
    draw_axis(svg, [*paid.ticks, *unpaid.ticks, *late.ticks, *support.ticks])
    for lane, top in zip((paid, unpaid, late, support), LANE_TOP, strict=True):
        draw_lane(svg, lane, top)
    draw_legend(svg)
    return svg.render()


# -- command line ----------------------------------------------------------------


def render_png(svg_path: Path, png_path: Path) -> None:
    tool = shutil.which("rsvg-convert")
    if tool is None:
        raise SystemExit("rsvg-convert not found: apt-get install librsvg2-bin")
    subprocess.run([tool, "--format", "png", "--output", str(png_path), str(svg_path)], check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Draw docs/img/account-timeline.svg")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="directory (default %(default)s)")
    parser.add_argument("--png", action="store_true", help="also render a PNG with rsvg-convert")
    parser.add_argument("--check", action="store_true", help="fail if the SVG is out of date")
    args = parser.parse_args(argv)
    svg_path = args.out / f"{NAME}.svg"
    content = render()
    if args.check:
        current = svg_path.read_text(encoding="utf-8") if svg_path.exists() else ""
        if current != content:
            print(f"{svg_path} is out of date: run scripts/generate", file=sys.stderr)
            return 1
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    svg_path.write_text(content, encoding="utf-8")
    print(f"wrote {svg_path}")
    if args.png:
        png_path = args.out / f"{NAME}.png"
        render_png(svg_path, png_path)
        print(f"wrote {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
