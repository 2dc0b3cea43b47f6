"""Text that came from a peer, made safe to log and to echo back.

A device's failure text, a rejection reason that quotes it, a topic: each is written into logs
and acknowledgements. Left as sent, a newline forges log lines, and 64 KB a message fills a disk
(issue 16: 17.6 MB of log from 300 messages). ``one_line`` is the one rule for all of them.
"""

from __future__ import annotations

MAX_TEXT_CHARS = 200


def one_line(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    """``text`` on one line of at most ``limit`` characters: every control, format or separator
    character (newlines, tabs, escapes, bidi overrides) becomes a space, runs of spaces one, and
    a longer text is cut with ``...`` at the end."""
    if limit < 4:
        raise ValueError(f"limit must be at least 4 characters, got {limit}")
    cleaned = " ".join("".join(c if c.isprintable() else " " for c in text[: 4 * limit]).split())
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."
