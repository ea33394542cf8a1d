"""Reading bulk invoice files (CSV with a header row, or JSON Lines) one row at a time.

The reader streams: it holds one physical line (at most `MAX_LINE_BYTES`) and one row at a time, so memory does
not grow with the file. It judges only what the file itself says (encoding, shape, how a CSV amount is written);
the payment rules are `producers.validation`'s, applied by `producers.batch.ingest` to every row.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import PurePath
from typing import IO, Any

from producers.validation import FIELD_NAME_SHAPE, FieldError, field_label

# A physical line longer than this is refused (its row is rejected, the rest of the file still read): an upload
# of one endless line must not be buffered whole.
MAX_LINE_BYTES = 64 * 1024
# CSV amounts and channel ids are plain base-10 integers: "100" is 100; "100.5", "1e3", "1,000", "abc" are refused
# rather than guessed at. Longer digit strings than this are certainly out of range (and int() refuses ~4300+).
INTEGER_TEXT = re.compile(r"-?[0-9]+")
INTEGER_DIGITS_MAX = 20

REQUIRED_COLUMNS = ("external_reference", "phone_number", "amount")
OPTIONAL_COLUMNS = ("customer_name", "channel_id")
INTEGER_COLUMNS = frozenset({"amount", "channel_id"})

NOT_UTF8 = "is not valid UTF-8 text"
LINE_TOO_LONG = f"is longer than {MAX_LINE_BYTES} bytes"
AMOUNT_TEXT_RULE = (
    "must be a whole number of shillings written in digits (no decimals, exponents, separators or text)"
)
CHANNEL_TEXT_RULE = "must be a positive integer written in digits"


class FileFormat(StrEnum):
    CSV = "csv"
    JSONL = "jsonl"


SUFFIX_FORMATS = {
    ".csv": FileFormat.CSV,
    ".jsonl": FileFormat.JSONL,
    ".ndjson": FileFormat.JSONL,
    ".jsonlines": FileFormat.JSONL,
}
MEDIA_TYPE_FORMATS = {
    "text/csv": FileFormat.CSV,
    "application/csv": FileFormat.CSV,
    "application/x-ndjson": FileFormat.JSONL,
    "application/jsonl": FileFormat.JSONL,
    "application/x-jsonlines": FileFormat.JSONL,
    "application/jsonlines": FileFormat.JSONL,
}


def format_for_name(name: str) -> FileFormat | None:
    return SUFFIX_FORMATS.get(PurePath(name).suffix.lower())


def format_for_media_type(content_type: str | None) -> FileFormat | None:
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    return MEDIA_TYPE_FORMATS.get(media_type)


@dataclass(frozen=True)
class LineError:
    """One problem with one line of the file (line 1 is the first line, the CSV header included)."""

    line: int
    error: FieldError


class BatchFileError(ValueError):
    """The file as a whole can't be read as a batch (empty, no usable header, not UTF-8): nothing is recorded."""

    def __init__(self, problems: list[LineError]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"line {p.line}: {p.error}" for p in problems))


@dataclass(frozen=True)
class FileRow:
    """One row: the fields it gives (ready for validate_payment) and what reading it found wrong."""

    line: int
    fields: dict[str, Any]
    errors: tuple[FieldError, ...] = ()


@dataclass
class ReadProgress:
    """Updated as the reader goes, for progress bars and batch counters."""

    bytes_read: int = 0
    rows_read: int = 0
    too_long_lines: set[int] = field(default_factory=set)


def _is_text(value: str) -> bool:
    """False when the text holds bytes that were not UTF-8 (kept as lone surrogates by `surrogateescape`)."""
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _physical_lines(stream: IO[bytes], progress: ReadProgress) -> Iterator[str]:
    """Decoded lines, one at a time. Undecodable bytes survive as surrogates so the row that holds them can be
    named and rejected; an over-long line is cut short and its number noted."""
    number = 0
    while True:
        raw = stream.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        number += 1
        progress.bytes_read += len(raw)
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            progress.too_long_lines.add(number)
            while True:
                rest = stream.readline(MAX_LINE_BYTES)
                progress.bytes_read += len(rest)
                if not rest or rest.endswith(b"\n"):
                    break
            raw = b"\n"
        if number == 1:
            raw = raw.removeprefix(codecs.BOM_UTF8)
        yield raw.decode("utf-8", "surrogateescape")


def _integer_cell(column: str, text: str) -> tuple[int | None, FieldError | None]:
    if not INTEGER_TEXT.fullmatch(text):
        return None, FieldError(column, AMOUNT_TEXT_RULE if column == "amount" else CHANNEL_TEXT_RULE)
    digits = text.lstrip("-")
    if len(digits) > INTEGER_DIGITS_MAX:
        # Certainly out of range: hand the schema a value it refuses by its range rule, naming the field.
        return (-1 if text.startswith("-") else 1) * 10**INTEGER_DIGITS_MAX, None
    return int(text), None


def _csv_header(row: list[str], line: int) -> list[str]:
    if any(not _is_text(cell) for cell in row):
        raise BatchFileError(
            [LineError(line, FieldError("file", NOT_UTF8 + " (save the file as UTF-8 CSV)"))]
        )
    columns = [cell.strip().lower() for cell in row]
    problems: list[LineError] = []
    known = set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS)
    expected = ", ".join(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)
    if not known & set(columns):
        # Most likely a file without a header row: its first line is a payment, whose cells (a phone, a name)
        # must not be repeated back as column names.
        raise BatchFileError(
            [
                LineError(
                    line,
                    FieldError("header", f"is missing: the first line must name the columns ({expected})"),
                )
            ]
        )
    for index, column in enumerate(columns):
        if column not in known:
            label = column if FIELD_NAME_SHAPE.fullmatch(column) else f"column {index + 1}"
            problems.append(LineError(line, FieldError(label, f"is not a known column ({expected})")))
    for column in sorted({c for c in columns if columns.count(c) > 1 and c in known}):
        problems.append(LineError(line, FieldError(column, "appears more than once in the header")))
    for column in REQUIRED_COLUMNS:
        if column not in columns:
            problems.append(LineError(line, FieldError(column, "column is missing from the header")))
    if problems:
        raise BatchFileError(problems)
    return columns


def _csv_row(columns: list[str], cells: list[str], line: int) -> FileRow:
    errors: list[FieldError] = []
    fields: dict[str, Any] = {}
    if len(cells) > len(columns):
        errors.append(FieldError("row", f"has {len(cells)} columns but the header has {len(columns)}"))
    for index, column in enumerate(columns):
        if index >= len(cells):
            errors.append(FieldError(column, "is missing from this row"))
            continue
        text = cells[index].strip()
        if not text:
            continue  # an empty cell is an absent value; the schema says whether that is allowed
        if not _is_text(text):
            errors.append(FieldError(column, NOT_UTF8))
            continue
        if column in INTEGER_COLUMNS:
            number, error = _integer_cell(column, text)
            if error is not None:
                errors.append(error)
                continue
            fields[column] = number
        else:
            fields[column] = text
    return FileRow(line, fields, tuple(errors))


def read_csv(stream: IO[bytes], progress: ReadProgress) -> Iterator[FileRow]:
    lines = _physical_lines(stream, progress)
    reader = csv.reader(lines, strict=True)
    columns: list[str] | None = None
    consumed = 0
    while True:
        first_line = consumed + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error:
            consumed = reader.line_num
            if columns is None:
                raise BatchFileError(
                    [LineError(first_line, FieldError("header", "is not well-formed CSV"))]
                ) from None
            progress.rows_read += 1
            yield FileRow(first_line, {}, (FieldError("row", "is not well-formed CSV (check its quotes)"),))
            continue
        consumed = reader.line_num
        if progress.too_long_lines & set(range(first_line, consumed + 1)):
            progress.too_long_lines.difference_update(range(first_line, consumed + 1))
            if columns is None:
                raise BatchFileError([LineError(first_line, FieldError("header", LINE_TOO_LONG))])
            progress.rows_read += 1
            yield FileRow(first_line, {}, (FieldError("line", LINE_TOO_LONG),))
            continue
        if not cells or all(not cell.strip() for cell in cells):
            continue  # blank lines carry no payment
        if columns is None:
            columns = _csv_header(cells, first_line)
            continue
        progress.rows_read += 1
        yield _csv_row(columns, cells, first_line)
    if columns is None:
        raise BatchFileError(
            [LineError(1, FieldError("file", "is empty: expected a header row and payment rows"))]
        )
    if progress.rows_read == 0:
        raise BatchFileError([LineError(consumed, FieldError("file", "holds a header but no payment rows"))])


def _json_strings_are_text(value: dict[str, Any]) -> list[FieldError]:
    # JSON escapes can spell lone surrogates ("\udc80"); the schema would silently drop them from a reference.
    return [
        FieldError(field_label(key), "is not valid Unicode text")
        for key, item in value.items()
        if isinstance(item, str) and not _is_text(item)
    ]


def read_jsonl(stream: IO[bytes], progress: ReadProgress) -> Iterator[FileRow]:
    number = 0
    rows = 0
    for text in _physical_lines(stream, progress):
        number += 1
        if number in progress.too_long_lines:
            progress.too_long_lines.discard(number)
            rows += 1
            progress.rows_read += 1
            yield FileRow(number, {}, (FieldError("line", LINE_TOO_LONG),))
            continue
        if not text.strip():
            continue
        rows += 1
        progress.rows_read += 1
        if not _is_text(text):
            yield FileRow(number, {}, (FieldError("line", NOT_UTF8),))
            continue
        try:
            value = json.loads(text)
        except RecursionError:
            yield FileRow(number, {}, (FieldError("line", "nests objects or lists too deeply"),))
            continue
        except ValueError:
            yield FileRow(number, {}, (FieldError("line", "is not valid JSON"),))
            continue
        if not isinstance(value, dict):
            yield FileRow(number, {}, (FieldError("line", "must be a JSON object"),))
            continue
        yield FileRow(number, value, tuple(_json_strings_are_text(value)))
    if rows == 0:
        raise BatchFileError(
            [LineError(1, FieldError("file", "is empty: expected one JSON object per line"))]
        )


def read_rows(stream: IO[bytes], file_format: FileFormat, progress: ReadProgress) -> Iterator[FileRow]:
    """Every payment row of the file, in order. Raises BatchFileError (before any row) when the file as a whole
    is unusable, or at its end when it held no rows."""
    if file_format is FileFormat.CSV:
        return read_csv(stream, progress)
    return read_jsonl(stream, progress)
