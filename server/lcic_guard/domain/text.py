"""Which characters free text that people read back may hold.

An override's actor and reason are recorded for good and shown by ``audit``
on a terminal. A control character there can move the cursor or rewrite
what is on screen (the C1 range included: U+009B is a CSI on some
terminals); a line or paragraph separator starts what looks like a new
row; a bidirectional control makes the text read in another order than it
is stored (U+202E shows ``txt.exe`` as ``exe.txt``). Each is a way to make
an audit trail say something it does not, so such text is refused where it
enters (a new event, an ApplyOverride request), rather than escaped where it
is shown. Facts stored before the rule keep loading as they are.

Pure: the rule is about the characters of a fact, whatever carried it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

BIDI_CONTROLS: Final = (
    "\u061c"  # ARABIC LETTER MARK
    "\u200e\u200f"  # LEFT-TO-RIGHT MARK, RIGHT-TO-LEFT MARK
    "\u202a\u202b\u202c\u202d\u202e"  # embeddings, overrides and their POP
    "\u2066\u2067\u2068\u2069"  # isolates and their POP
)
"""The characters that change the order in which text is displayed."""

# Unicode's Cc is exactly U+0000-U+001F and U+007F-U+009F (a stable set), Zl
# is U+2028 and Zp U+2029: one character class, about 30 times faster than
# asking unicodedata for each character of a 2,000-character reason.
_REFUSED: Final = re.compile(f"[\x00-\x1f\x7f-\x9f\u2028\u2029{BIDI_CONTROLS}]")
SHOWN_FIELDS: Final = ("actor", "reason")
"""The free-text fields of facts that ``audit`` shows."""


def unsafe_character(text: str) -> tuple[int, str] | None:
    """The position and the first character of ``text`` that must not be in
    text shown to a person (a control, including C1; a line or paragraph
    separator; a bidirectional control), or None when there is none."""
    found = _REFUSED.search(text)
    return None if found is None else (found.start(), found.group())


def unsafe_text_problem(text: str) -> str | None:
    """Why ``text`` may not be shown as it is (for an error that names the
    field before it), or None when it may."""
    found = unsafe_character(text)
    if found is None:
        return None
    i, c = found
    return (
        "must not contain control, line-separator or bidirectional characters "
        f"(U+{ord(c):04X} at character {i + 1})"
    )


def unshowable_field(values: Mapping[str, object]) -> str | None:
    """``FIELD: why`` for the first of a new fact's :data:`SHOWN_FIELDS`
    that may not be shown as it is, or None."""
    for name in SHOWN_FIELDS:
        value = values.get(name)
        problem = unsafe_text_problem(value) if isinstance(value, str) else None
        if problem is not None:
            return f"{name}: {problem}"
    return None
