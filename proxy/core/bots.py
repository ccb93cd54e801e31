"""Is this user agent a crawler, a monitor or a headless browser, and which?

The list is the public one most tools share, monperrus/crawler-user-agents
(the ``crawler-user-agents`` package: about 1,500 patterns, each with tags
such as ``search-engine``, ``seo``, ``monitoring``, ``browser-automation``),
kept up to date by its maintainers rather than by a regular expression of
ours. What is ours is only how it is searched: the package tries its
patterns in chunks (about 125 µs for a user agent that matches none, the
common case), so ``BotList`` indexes each pattern by three characters every
match must contain (the pattern's longest literal run) and runs only the
patterns whose three characters the user agent holds: a few µs, and a
bounded memo of answers per user agent on top, since a site's visitors
share a few hundred of them.

Pure: no settings, no I/O after the list is read once.
"""

from __future__ import annotations

import re
from re import _constants as sre_constants  # type: ignore[attr-defined]  # the pattern parser's opcodes
from re import _parser as sre_parser  # type: ignore[attr-defined]

import crawleruseragents

# The class a match is counted under: the entry's first tag, one of these.
CLASSES = (
    "search-engine", "seo", "monitoring", "browser-automation", "scanner", "advertising", "social-preview",
    "feed-reader", "ai-crawler", "http-library", "archiver", "academic",
)
OTHER = "other"
MAX_REMEMBERED = 8192  # user agents whose answer is kept
MAX_CHARS = 512  # of a user agent, looked at (and remembered): the memo stays under 5 MB


def _literal(pattern: str) -> str:
    """The longest run of plain characters every match of ``pattern`` contains
    ("" when the pattern's top level is an alternation or a class)."""
    try:
        parsed = sre_parser.parse(pattern)
    except re.error:
        return ""
    best = run = ""
    for op, arg in parsed:
        if op is sre_constants.LITERAL:
            run += chr(arg)
        else:
            best, run = max(best, run, key=len), ""
    return max(best, run, key=len)


class BotList:
    """``kind(user_agent)``: the class of the first entry (in the list's order)
    that matches, or None."""

    def __init__(self, entries: list[dict] | None = None) -> None:
        entries = crawleruseragents.CRAWLER_USER_AGENTS_DATA if entries is None else entries
        # three characters -> (place in the list, literal, pattern, class)
        self._index: dict[str, list[tuple[int, str, re.Pattern[str], str]]] = {}
        self._always: list[tuple[int, str, re.Pattern[str], str]] = []
        for place, entry in enumerate(entries):
            try:
                regex = re.compile(entry["pattern"])
            except re.error:
                continue  # a pattern Python cannot read is skipped, never fatal
            tags = entry.get("tags") or []
            kind = tags[0] if tags and tags[0] in CLASSES else OTHER
            literal = _literal(entry["pattern"])
            if len(literal) >= 3:
                self._index.setdefault(literal[:3], []).append((place, literal, regex, kind))
            else:
                self._always.append((place, "", regex, kind))
        self._known: dict[str, str | None] = {}

    def kind(self, user_agent: str) -> str | None:
        user_agent = user_agent[:MAX_CHARS]
        known = self._known.get(user_agent, "")
        if known != "":
            return known
        found = self._search(user_agent)
        if len(self._known) >= MAX_REMEMBERED:
            self._known.clear()
        self._known[user_agent] = found
        return found

    def _search(self, ua: str) -> str | None:
        """The class of the first entry in the list's order that matches."""
        index = self._index
        best: tuple[int, str] | None = None
        candidates = [e for tri in {ua[i : i + 3] for i in range(len(ua) - 2)} & index.keys() for e in index[tri]]
        for place, literal, regex, kind in candidates + self._always:
            if (best is None or place < best[0]) and literal in ua and regex.search(ua):
                best = (place, kind)
        return best[1] if best is not None else None
