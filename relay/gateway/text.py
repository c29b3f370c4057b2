"""What text a recall request may carry, and how the reason is cut for Tencent.

A reason and a moderator end up in audit trails, in logs, in terminals and in Tencent's clients,
so characters that change how the text around them reads are refused rather than carried:
control characters (C0 with CR, LF and TAB, DEL, C1: a ``\\r\\n`` forges a log line, ``\\x1b[``
repaints a terminal), bidirectional controls (U+202E shows ``moc.evil`` as ``live.com``) and the
line and paragraph separators. An ID must also be free of every invisible format character (a
zero-width space makes ``admin\\u200b`` look like ``admin``). Pure code.
"""

from __future__ import annotations

import unicodedata

import regex

# Unicode's bidirectional formatting characters (UAX #9): ALM, LRM, RLM, LRE..RLO, LRI..PDI.
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_SEPARATORS = frozenset({"Zl", "Zp"})  # U+2028, U+2029: newlines to most log viewers
_GRAPHEME = regex.compile(r"\X")


def refusal(value: str, *, identifier: bool) -> str | None:
    """Why *value* cannot be accepted, or None. *identifier*: an ID (also no invisible format
    characters at all), rather than free text such as a reason (where a zero-width joiner holds
    an emoji sequence together)."""
    for char in value:
        category = unicodedata.category(char)
        if category == "Cc":
            return f"contains the control character U+{ord(char):04X}"
        if char in BIDI_CONTROLS:
            return f"contains the bidirectional control U+{ord(char):04X}"
        if category in _SEPARATORS:
            return f"contains the line separator U+{ord(char):04X}"
        if identifier and category == "Cf":
            return f"contains the invisible format character U+{ord(char):04X}"
    return None


def nfc(value: str) -> str:
    """Unicode NFC: one spelling for what reads the same (``é`` as one code point, not ``e`` + accent),
    so a moderator ID compares and matches patterns the way a person reads it."""
    return unicodedata.normalize("NFC", value)


def cut_graphemes(text: str, limit: int) -> str:
    """*text* cut to at most *limit* UTF-8 bytes without splitting a user-perceived character
    (an extended grapheme cluster: a letter and its accents, an emoji and its modifiers)."""
    if len(text.encode()) <= limit:
        return text
    used = 0
    end = 0
    for match in _GRAPHEME.finditer(text):
        size = len(match.group().encode())
        if used + size > limit:
            break
        used += size
        end = match.end()
    return text[:end]
