"""Fail-points for the reliability tests: a worker SIGKILLs itself at a named point of a send, once per marker file
(Settings.fault_kill_at). A no-op in production, where the setting is empty."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from worker.settings import get_settings

log = logging.getLogger("stkpush.faults")


def fail_point(name: str) -> None:
    settings = get_settings()
    if settings.fault_kill_at != name or not settings.fault_marker_file:
        return
    marker = Path(settings.fault_marker_file)
    try:
        marker.touch(exist_ok=False)
    except FileExistsError:
        return
    log.warning("fail-point %s: killing this worker process", name)
    os.kill(os.getpid(), signal.SIGKILL)
