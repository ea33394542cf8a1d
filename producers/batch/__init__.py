"""Bulk invoice batches, one job a module: `reading.py` streams CSV / JSON Lines rows, `ingest.py` judges each
row with the one schema and records the good ones chunk by chunk, `publish.py` queues them in one pipeline,
`rejects.py` writes the bad rows' line, field and rule, `report.py` counts, `status.py` answers "how is it going"."""

from producers.batch.ingest import CHUNK_ROWS, REFERENCE_REQUIRED, ingest_batch, open_batch
from producers.batch.reading import BatchFileError, FileFormat, format_for_media_type, format_for_name
from producers.batch.rejects import REJECTS_COLUMNS, iter_rejects
from producers.batch.report import BatchCounts, BatchReport
from producers.batch.status import batch_status

__all__ = [
    "CHUNK_ROWS",
    "REFERENCE_REQUIRED",
    "REJECTS_COLUMNS",
    "BatchCounts",
    "BatchFileError",
    "BatchReport",
    "FileFormat",
    "batch_status",
    "format_for_media_type",
    "format_for_name",
    "ingest_batch",
    "iter_rejects",
    "open_batch",
]
