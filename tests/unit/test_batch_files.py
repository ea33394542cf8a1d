"""Reading batch files: what the file itself says (encoding, shape, how a CSV amount is written), row by row,
with the line each row starts on, and without reading ahead."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from producers.batch.reading import (
    AMOUNT_TEXT_RULE,
    LINE_TOO_LONG,
    MAX_LINE_BYTES,
    NOT_UTF8,
    BatchFileError,
    FileFormat,
    FileRow,
    ReadProgress,
    format_for_media_type,
    format_for_name,
    read_rows,
)

HEADER = b"external_reference,phone_number,amount,customer_name\n"


def csv_rows(data: bytes) -> list[FileRow]:
    return list(read_rows(io.BytesIO(data), FileFormat.CSV, ReadProgress()))


def jsonl_rows(data: bytes) -> list[FileRow]:
    return list(read_rows(io.BytesIO(data), FileFormat.JSONL, ReadProgress()))


def problems(error: BatchFileError) -> list[tuple[int, str, str]]:
    return [(p.line, p.error.field, p.error.rule) for p in error.problems]


@pytest.mark.parametrize(
    ("cell", "amount"),
    [("100", 100), (" 100 ", 100), ("-5", -5), ("0", 0), ("007", 7), ("1" + "0" * 25, 10**20)],
)
def test_csv_amounts_written_as_base_10_integers_are_read_as_integers(cell: str, amount: int) -> None:
    [row] = csv_rows(HEADER + f"R1,0712345678,{cell},\n".encode())
    assert row.errors == () and row.fields["amount"] == amount


@pytest.mark.parametrize(
    "cell", ["100.5", "1e3", "1,000", "abc", "+5", "10 000", "0x10", "١٢٣", "5KES", "- 5"]
)
def test_csv_amounts_that_are_not_plain_integers_are_refused_by_name(cell: str) -> None:
    [row] = csv_rows(HEADER + f'R1,0712345678,"{cell}",\n'.encode())
    assert [(e.field, e.rule) for e in row.errors] == [("amount", AMOUNT_TEXT_RULE)]
    assert "amount" not in row.fields


def test_empty_cells_are_absent_values_and_header_names_are_forgiving() -> None:
    data = b"\xef\xbb\xbf External_Reference ,PHONE_NUMBER,amount,customer_name\r\nR1,0712345678,,\r\n"
    [row] = csv_rows(data)
    assert row.fields == {"external_reference": "R1", "phone_number": "0712345678"}
    assert row.errors == ()


def test_rows_carry_the_line_they_start_on_across_blank_lines_and_quoted_line_breaks() -> None:
    data = HEADER + b'\nR1,0712345678,1,"two\nline name"\n\n\nR2,0712345678,2,x\r\nR3,0712345678,3,x'
    assert [(row.line, row.fields["external_reference"]) for row in csv_rows(data)] == [
        (3, "R1"),
        (7, "R2"),
        (8, "R3"),
    ]


def test_short_and_long_rows_name_what_is_wrong() -> None:
    short, long = csv_rows(HEADER + b"R1,0712345678\nR2,0712345678,5,x,extra\n")
    assert [(e.field, e.rule) for e in short.errors] == [
        ("amount", "is missing from this row"),
        ("customer_name", "is missing from this row"),
    ]
    assert [e.field for e in long.errors] == ["row"]


def test_a_cell_that_is_not_utf8_is_named_and_the_row_goes_on() -> None:
    bad, good = csv_rows(HEADER + b"R1,0712345678,5,Ren\xe9e\nR2,0712345678,6,Renee\n")
    assert [(e.field, e.rule) for e in bad.errors] == [("customer_name", NOT_UTF8)]
    assert bad.fields["amount"] == 5 and good.errors == ()


def test_a_malformed_quote_rejects_its_row_only() -> None:
    bad, good = csv_rows(HEADER + b'R1,"0712"345678,5,x\nR2,0712345678,6,y\n')
    assert [e.field for e in bad.errors] == ["row"] and bad.line == 2
    assert good.line == 3 and good.errors == ()


def test_an_endless_line_is_refused_without_being_buffered_and_the_next_row_is_read() -> None:
    endless = b"R1,0712345678,5," + b"x" * (MAX_LINE_BYTES * 3) + b"\n"
    progress = ReadProgress()
    rows = list(read_rows(io.BytesIO(HEADER + endless + b"R2,0712345678,6,y\n"), FileFormat.CSV, progress))
    assert [(row.line, [(e.field, e.rule) for e in row.errors]) for row in rows] == [
        (2, [("line", LINE_TOO_LONG)]),
        (3, []),
    ]
    assert progress.bytes_read == len(HEADER) + len(endless) + len(b"R2,0712345678,6,y\n")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"external_reference,phone_number\n", [(1, "amount", "column is missing from the header")]),
        (
            b"external_reference,phone,amount\n",
            [(1, "phone", "is not a known column"), (1, "phone_number", "column is missing from the header")],
        ),
        (b"external_reference,phone_number,amount,amount\n", [(1, "amount", "appears more than once")]),
    ],
)
def test_a_header_without_the_required_columns_refuses_the_whole_file(
    header: bytes, expected: list[tuple[int, str, str]]
) -> None:
    with pytest.raises(BatchFileError) as caught:
        csv_rows(header + b"R1,0712345678,5\n")
    found = problems(caught.value)
    assert [(line, field) for line, field, _ in found] == [(line, field) for line, field, _ in expected]
    assert all(part in rule for (_, _, rule), (_, _, part) in zip(found, expected, strict=True))


@pytest.mark.parametrize(
    ("data", "rule"),
    [
        (b"", "is empty"),
        (b"\n\n", "is empty"),
        (HEADER, "holds a header but no payment rows"),
        (HEADER.decode().encode("utf-16"), NOT_UTF8),
        (HEADER.decode().encode("utf-32"), NOT_UTF8),
    ],
    ids=["empty", "blank", "header-only", "utf-16", "utf-32"],
)
def test_empty_and_wrongly_encoded_csv_files_are_refused(data: bytes, rule: str) -> None:
    with pytest.raises(BatchFileError) as caught:
        csv_rows(data)
    assert rule in str(caught.value)


def test_json_lines_take_values_as_they_are_and_name_unreadable_lines() -> None:
    lines = [
        json.dumps({"external_reference": "R1", "phone_number": "0712345678", "amount": "100"}).encode(),
        b"",
        b"{oops",
        b'"just a string"',
        b'{"external_reference": "R\\udc80", "amount": 1}',
        b'{"customer_name": "Ren\xe9e"}',
        b"\xef\xbb\xbf" + json.dumps({"amount": 1}).encode(),
    ]
    rows = jsonl_rows(b"\n".join(lines) + b"\n")
    summary: list[tuple[int, Any, list[str]]] = [
        (row.line, row.fields.get("amount"), [e.field for e in row.errors]) for row in rows
    ]
    assert summary == [
        (1, "100", []),
        (3, None, ["line"]),
        (4, None, ["line"]),
        (5, 1, ["external_reference"]),
        (6, None, ["line"]),
        (7, None, ["line"]),
    ]


def test_an_empty_json_lines_file_is_refused() -> None:
    with pytest.raises(BatchFileError, match="is empty"):
        jsonl_rows(b"\n \n")


class CountingStream(io.RawIOBase):
    """An endless CSV that counts how much of it was read."""

    def __init__(self) -> None:
        self.served = 0
        self.row = b"R1,0712345678,5,Jane Doe\n"
        self.header_sent = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = (b"" if self.header_sent else HEADER) + self.row * (len(buffer) // len(self.row))
        self.header_sent = True
        size = min(len(buffer), len(chunk))
        buffer[:size] = chunk[:size]
        self.served += size
        return size


def test_reading_streams_rows_without_reading_the_file_ahead() -> None:
    raw = CountingStream()
    rows = read_rows(io.BufferedReader(raw), FileFormat.CSV, ReadProgress())
    for _ in range(1000):
        next(rows)
    # 1000 rows are ~26 KB; a reader that slurped the (endless) file would never get here.
    assert raw.served < 200_000


@pytest.mark.parametrize(
    ("name", "media_type", "by_name", "by_type"),
    [
        ("march.CSV", "text/csv; charset=utf-8", FileFormat.CSV, FileFormat.CSV),
        ("a.jsonl", "application/x-ndjson", FileFormat.JSONL, FileFormat.JSONL),
        ("a.ndjson", "application/jsonl", FileFormat.JSONL, FileFormat.JSONL),
        ("a.txt", "application/octet-stream", None, None),
    ],
)
def test_the_format_is_told_by_name_or_media_type(
    name: str, media_type: str, by_name: FileFormat | None, by_type: FileFormat | None
) -> None:
    assert format_for_name(name) == by_name and format_for_media_type(media_type) == by_type


@pytest.mark.parametrize(
    ("cell", "written"),
    [
        ("=HYPERLINK(1)", "'=HYPERLINK(1)"),
        ("+1+1", "'+1+1"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tx", "\\x09x"),
        ("a\x00b\x1b[2J", "a\\x00b\\x1b[2J"),
        ("line\u2028break", "line\\u2028break"),
        ("external_reference", "external_reference"),
    ],
)
def test_rejects_cells_are_inert_in_a_spreadsheet(cell: str, written: str) -> None:
    # Issue 15, item 4: the way spreadsheet exports neutralise formulas; control bytes become visible escapes.
    from producers.batch.rejects import spreadsheet_safe

    assert spreadsheet_safe(cell) == written


def test_a_csv_without_a_header_row_is_refused_without_repeating_its_first_row() -> None:
    # Issue 15, item 2: the first row (a phone, a name) used to come back as "unknown columns".
    with pytest.raises(BatchFileError) as caught:
        csv_rows(b"INV-1,0733445566,100,Wanjiru Kamau\n")
    assert [(p.line, p.error.field) for p in caught.value.problems] == [(1, "header")]
    assert "0733445566" not in str(caught.value) and "wanjiru" not in str(caught.value).lower()


def test_a_json_line_nested_too_deep_is_that_lines_reject() -> None:
    # Issue 15, item 3: RecursionError used to end the whole batch.
    data = b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"\n" + json.dumps({"amount": 1}).encode() + b"\n"
    rows = list(read_rows(io.BytesIO(data), FileFormat.JSONL, ReadProgress()))
    assert [(row.line, [e.field for e in row.errors]) for row in rows] == [(1, ["line"]), (2, [])]
