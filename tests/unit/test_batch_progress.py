"""The CLI's progress display without a terminal (the bar on a terminal is tested through a pty in
tests/integration/batch)."""

from __future__ import annotations

import pytest

from producers.batch import BatchCounts
from producers.batch.reading import ReadProgress
from worker.cli.batch import ProgressDisplay


def test_without_a_terminal_progress_is_one_plain_line_per_tenth_of_the_file(
    capsys: pytest.CaptureFixture[str],
) -> None:
    display = ProgressDisplay(1000, terminal=False)
    counts = BatchCounts()
    for step in range(1, 101):  # a callback per 10 bytes: 100 calls
        counts.rows_recorded = step
        display("recording", ReadProgress(bytes_read=step * 10, rows_read=step), counts)
    display.close()
    lines = capsys.readouterr().err.splitlines()
    assert 10 <= len(lines) <= 11
    assert lines[-1] == "recording: 100 rows read (100%), 100 recorded, 0 skipped, 0 bad"
    assert all("\r" not in line for line in lines)
