"""The rejects file of a batch: one CSV row (line, field, rule) per bad row; never a value from the file."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import IO

from producers.validation import FieldError

REJECTS_COLUMNS = ("line", "field", "rule")
# A cell starting with one of these is a formula to a spreadsheet (OWASP's CSV injection list); like spreadsheet
# exports do, such a cell is written after a `'`, which makes it text.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(text: str) -> str:
    """The cell as inert text: control characters written as escapes, a would-be formula prefixed with `'`."""
    escaped = "".join(
        ch if ch.isprintable() else (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        for ch in text
    )
    return "'" + escaped if escaped.startswith(FORMULA_STARTS) else escaped


class RejectsFile:
    """The rejects CSV (line, field, rule), opened on the first bad row. Never holds a value from the file.

    A chunk's rejects are found in two steps (row rules, then references), so they are held until the chunk
    ends and written in line order."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.written = False
        self._pending: list[tuple[int, FieldError]] = []
        self._stream: IO[str] | None = None

    def add(self, line: int, error: FieldError) -> None:
        self._pending.append((line, error))

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        if self.path is None or not pending:
            return
        if self._stream is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._stream = self.path.open("w", newline="", encoding="utf-8")
            csv.writer(self._stream).writerow(REJECTS_COLUMNS)
            self.written = True
        writer = csv.writer(self._stream)
        for line, error in sorted(pending, key=lambda item: item[0]):
            writer.writerow((line, spreadsheet_safe(error.field), spreadsheet_safe(error.rule)))

    def close(self) -> None:
        self.flush()
        if self._stream is not None:
            self._stream.close()
            self._stream = None


def iter_rejects(path: str | Path, limit: int | None = None) -> Iterator[dict[str, str]]:
    """The rows of a rejects file (line, field, rule), at most `limit` of them."""
    with open(path, newline="", encoding="utf-8") as stream:
        yield from islice(csv.DictReader(stream), limit)
