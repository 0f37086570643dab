"""Parsed headers shared between reads, for the messages inspection parses.

The email package parses a header anew on every read, building a class and a parse
tree each time: `get_content_type`, `get_filename` and `get_content_charset` each parse
Content-Type again, and the parser itself reads it three times per part. That was most
of the CPU of inspecting a short message. A parsed header is a function of its name and
raw value, and immutable (a str with read-only views of its parameters and defects), so
one object can serve every read of a MIME header: within a message, and across
messages for the values that recur ("text/plain; charset=utf-8", "base64").

A parse tree takes up to about 2 KB per character of the value (a list of addresses or
of parameters), so the cache is bounded by the characters it holds, not by a count:
at most about 8 MB, and about 1 MB for ordinary headers.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from email import policy as email_policy
from email.message import EmailMessage
from typing import TYPE_CHECKING

# The headers the parser and the MIME walk read again and again. Others (Subject, read
# once, and different in every message) are parsed on every read, as before.
SHARED_NAMES = frozenset({"content-type", "content-disposition", "content-transfer-encoding"})
MAX_HEADER_CHARS = 256  # longer values too
MAX_TOTAL_CHARS = 4096

_LINESEP = re.compile(r"\n|\r")

if TYPE_CHECKING:  # generic in typeshed only
    EmailPolicy = email_policy.EmailPolicy[EmailMessage]
else:
    EmailPolicy = email_policy.EmailPolicy

_Factory = Callable[[str, str], str]


class SharedHeaders:
    """Least recently read first out, once the values held exceed `max_chars`."""

    def __init__(self, max_chars: int = MAX_TOTAL_CHARS) -> None:
        self.max_chars = max_chars
        self._held: OrderedDict[tuple[_Factory, str, str], str] = OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()  # inspection of large messages runs in threads

    def __len__(self) -> int:
        return len(self._held)

    def parsed(self, factory: _Factory, name: str, value: str) -> str:
        key = (factory, name, value)
        with self._lock:
            header = self._held.get(key)
            if header is not None:
                self._held.move_to_end(key)
                return header
        # As EmailPolicy.header_fetch_parse (str.splitlines would split on more).
        # A value that fails to parse raises here each time, as it did before.
        header = factory(name, "".join(_LINESEP.split(value)))
        with self._lock:
            if key not in self._held:
                self._held[key] = header
                self._chars += len(value)
                while self._chars > self.max_chars:
                    (_, _, dropped), _ = self._held.popitem(last=False)
                    self._chars -= len(dropped)
        return header


class InspectionPolicy(EmailPolicy):
    """An EmailPolicy whose header reads come from `SharedHeaders`."""

    shared = SharedHeaders()

    def header_fetch_parse(self, name: str, value: str) -> str:
        if (hasattr(value, "name") or len(value) > MAX_HEADER_CHARS
                or name.lower() not in SHARED_NAMES):
            parsed: str = super().header_fetch_parse(name, value)
            return parsed
        return self.shared.parsed(self.header_factory, name, value)
