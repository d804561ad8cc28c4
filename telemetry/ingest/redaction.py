"""What keeps secrets out of the database and makes values safe for PostgreSQL.

Secrets by key (`password`, `api_key`, `github_token`, …) and by value (bearer and
basic credentials, `user:pass@` in URLs, GitHub and OpenAI-style keys) become
`[redacted]`; NULs and lone surrogates are cleaned; depth, key count and string
length are bounded, and a record that was cut says so (`_truncated`).

Walking a record is the expensive part, so cheap searches of the raw bytes decide
whether a walk can matter at all: `WALK_HINT` for one line, `BODY_WALK_HINT` for a
whole body at once (the worker). Every receiver cleans through this module.
"""

from __future__ import annotations

import re
from typing import Any

import re2

MAX_DEPTH = 32
MAX_STRING = 32_768
MAX_MESSAGE = 8_192
MAX_KEYS = 512
ELLIPSIS = "…"
REDACTED = "[redacted]"

# Keys whose values are secrets. Matched on the whole key or its last `_`/`-`
# part, so `github_token` and `api_key` are caught but `tokens_in` is not.
SECRET_KEY = re.compile(
    r"^(?:.*[_\-.])?(?:password|passwd|pwd|secret|secret_key|client_secret|token|"
    r"access_token|refresh_token|auth_token|api_key|apikey|private_key|credentials?|"
    r"authorization|cookie|set_cookie)$",
    re.IGNORECASE,
)
# Secret values inside any text. The URL scheme is anchored at a word start and
# bounded, and so is the user part: unbounded, a long run of letters made the
# search quadratic, which a public endpoint (the beacon) cannot afford.
SECRET_VALUE = re.compile(
    r"(?i)(?P<scheme>\bbearer\s+|\bbasic\s+)[A-Za-z0-9._~+/=\-]+"
    r"|(?P<url>\b[a-z][a-z0-9+.\-]{0,31}://)[^/\s\"'@]{1,256}@"
    r"|\bgh[pousr]_[A-Za-z0-9]{20,}"
    r"|\bsk-[A-Za-z0-9_\-]{20,}"
)
# Cheap tests on a raw line, lowered once (a (?i) pattern is several times slower).
# Every key SECRET_KEY matches ends in one of these words, and a JSON key is
# followed by its closing quote, hence `token"` (a bare `_token` would flag every
# `prompt_tokens` of an LLM call). The value hints cover what SECRET_VALUE matches,
# also with JSON-escaped slashes (`https:\/\/user:pw@`).
REDACT_HINT = re.compile(
    rb'passw|pwd|secret|token"|api_?key|private_key|credential|authorization|cookie'
    rb'|bearer|basic|:\\?/\\?/[^/\s"]*@|gh[pousr]_|sk-'
    # An ASCII character written as a JSON escape (`pass\u0077ord`) hides a key or
    # value from the tests above: such a line is redacted after decoding.
    rb"|\\u00[2-7]"
)
# Whether a line is walked at all: REDACT_HINT plus what needs cleaning (NUL, lone
# surrogates, U+FFFD). The same lines, written for Python's re, which tries the
# whole alternation at each byte that can start a branch: each branch starts at its
# rarest byte (w, k, z, /, …) and checks what comes before with a lookbehind.
WALK_HINT = re.compile(
    rb"w(?:(?<=passw)|(?<=pw)d)"
    rb'|k(?:(?<=tok)en"|(?<=api_k)ey|(?<=apik)ey|(?<=private_k)ey|(?<=cook)ie|(?<=sk)-)'
    rb"|z(?<=authoriz)ation"
    rb"|cr(?:(?<=secr)et|edential)"
    rb"|b(?:earer|asic)"
    rb"|gh[pousr]_"
    rb'|/(?:(?<=:/)|(?<=:\\/))\\?/[^/\s"]*@'
    rb"|\\u(?:0000|d|00[2-7])|\xef\xbf\xbd"
)
# The lines WALK_HINT matches, and a few more, found by RE2 in a whole body in one
# pass: the worker reads the lines it finds the slow way. Latin-1, so that byte
# escapes match bytes, not UTF-8 code points; case-insensitive rather than a search
# of a lowered copy of the body (RE2 also folds Latin-1 letters: it may find a
# little more, never less).
_RE2_LATIN1 = re2.Options()
_RE2_LATIN1.encoding = re2.Options.Encoding.LATIN1
BODY_WALK_HINT = re2.compile(
    rb'(?i)passw|pwd|secret|token"|api_?key|private_key|credential|authorization|cookie'
    rb'|bearer|basic|:\\?/\\?/[^/\t\n\x0b\x0c\r "]*@|gh[pousr]_|sk-'
    rb"|\\u(?:0000|d|00[2-7])|\xef\xbf\xbd"
    # Numbers orjson refuses (beyond 64 bits, beyond a double), which the lenient
    # parser reads: a line holding one is read the slow way.
    rb"|[:,\[ \t\r]-?[0-9]+(?:\.[0-9]+)?(?:[0-9]{18}|e[+\-]?[0-9]{3})"
    # More brackets than MAX_DEPTH in a line: it may nest too deep.
    + rb"|(?:[^\n{\[]*[{\[]){%d}"
    % (MAX_DEPTH + 1),
    _RE2_LATIN1,
)


def redact_match(match: re.Match) -> str:
    if match.group("scheme"):
        return match.group("scheme") + REDACTED
    if match.group("url"):
        return match.group("url") + REDACTED + "@"
    return REDACTED


class Scrubber:
    """Cleans one value in place: secrets, NULs, surrogates, size bounds.

    `truncated` says whether anything was cut, for the `_truncated` flag.
    """

    def __init__(self, redact: bool = True):
        self.redact = redact
        self.truncated = False

    def text(self, value: str, limit: int = MAX_STRING) -> str:
        if "\x00" in value:
            value = value.replace("\x00", "")
        ascii_only = value.isascii()
        if not ascii_only:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                # Lone surrogates: PostgreSQL refuses them; show U+FFFD instead.
                value = value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        if len(value) > limit:  # cut first: redaction then scans at most `limit`
            self.truncated = True
            value = value[: limit - 1] + ELLIPSIS
        if self.redact and (not ascii_only or may_hold_secret(value)):
            value = SECRET_VALUE.sub(redact_match, value)
        return value

    def key(self, key: Any) -> tuple[str, bool]:
        """A dict key cleaned as text, and whether its value is a secret."""
        found = _KEYS.get(key) if type(key) is str else None
        if found is None:
            text = self.text(str(key), 200)
            found = (text, SECRET_KEY.match(text) is not None)
            if type(key) is str and len(key) <= 64 and text == key:
                if len(_KEYS) >= 4096:  # keys repeat (frames, headers): a bounded memo
                    _KEYS.clear()
                _KEYS[key] = found
        return found[0], found[1] and self.redact

    def walk(self, value: Any, depth: int = 0) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            if depth >= MAX_DEPTH:
                self.truncated = True
                return "[too deep]"
            out = {}
            for i, (key, item) in enumerate(value.items()):
                if i >= MAX_KEYS:
                    self.truncated = True
                    break
                key, secret = self.key(key)
                if secret and item not in (None, "", [], {}):
                    out[key] = REDACTED
                else:
                    out[key] = self.walk(item, depth + 1)
            return out
        if isinstance(value, list):
            if depth >= MAX_DEPTH:
                self.truncated = True
                return "[too deep]"
            if len(value) > MAX_KEYS:
                self.truncated = True
                value = value[:MAX_KEYS]
            return [self.walk(item, depth + 1) for item in value]
        if isinstance(value, float) and value != value:  # NaN is not JSON
            return None
        if isinstance(value, int) and not -(2**63) <= value < 2**64:
            # The stdlib parser keeps huge integers exact; orjson cannot write them.
            self.truncated = True
            return str(value)[:64] + ELLIPSIS
        return value


_KEYS: dict[str, tuple[str, bool]] = {}


def may_hold_secret(value: str) -> bool:
    """Whether SECRET_VALUE can match an ASCII `value`: every branch needs one of these
    (bearer, basic, the `@` of `user:pass@`, gh?_, sk-). Plain substring tests on a
    lowered copy cost a tenth of the regex, and most text holds none of them. (For
    other text the regex's Unicode case folding, `ſ` for `s`, goes further than
    `lower()`: it always runs.)"""
    if "@" in value:
        return True
    low = value.lower()
    return "gh" in low or "sk-" in low or "bearer" in low or "basic" in low


def is_secret_key(key: str) -> bool:
    return SECRET_KEY.match(key) is not None


def redact_text(value: str) -> str:
    return SECRET_VALUE.sub(redact_match, value)
