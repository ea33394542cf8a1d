"""`/dashboard` in a real browser: headless Chromium renders the seeded numbers, masks numbers, and refreshes.

Chromium is Debian's `chromium` package. Locally the browser tests skip without it; in CI (CI=true) they fail.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import struct
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import IN_CI
from tests.ops.conftest import BATCH_NAME, FAILURE_LIMIT, PHONE_PROVIDER_BLOCK, PHONE_STREAK, SeededWeb
from worker.phones import mask_phone

WINDOW = (1280, 1100)


@pytest.fixture(scope="module")
def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    if IN_CI:
        pytest.fail("chromium is required in CI (apt-get install chromium)")
    pytest.skip("chromium is not installed (apt-get install chromium)")


@pytest.fixture
def profile(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "chromium-profile"
    directory.mkdir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def headless(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        *args,
    ]
    # Chromium starts helper processes: its own session lets the timeout kill all of them.
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.communicate()
        raise
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


def rendered_dom(chromium: str, profile: Path, url: str, budget_ms: int) -> str:
    # Virtual time runs the page's timers and fetches for `budget_ms` without waiting that long in real time.
    result = headless(chromium, profile, f"--virtual-time-budget={budget_ms}", "--dump-dom", url)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "<html" in result.stdout, result.stderr[-2000:]
    return result.stdout


def cell(dom: str, element_id: str) -> str:
    match = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', dom)
    assert match, f"no element #{element_id}"
    return html.unescape(match.group(1)).strip()


def test_dashboard_data_has_the_seeded_numbers(seeded_web: SeededWeb) -> None:
    data = httpx.get(seeded_web.url + "/dashboard/data", timeout=10).json()
    assert data["payments"] == seeded_web.by_state
    guard = data["guard"]
    assert (guard["failures_in_window"], guard["in_flight"], guard["headroom"], guard["failure_limit"]) == (
        seeded_web.failures_in_window,
        seeded_web.in_flight,
        seeded_web.headroom,
        FAILURE_LIMIT,
    )
    assert guard["restricted_until"] and guard["restriction_reason"] == "provider: abuse restriction"
    assert 500 < data["paused_s"] <= 600
    assert sorted(b["phone"] for b in data["blocked"]) == seeded_web.blocked_masked
    causes = {b["phone"]: b["cause"] for b in data["blocked"]}
    assert causes[mask_phone(PHONE_STREAK)] == "failure streak at the limit"
    assert causes[mask_phone(PHONE_PROVIDER_BLOCK)] == "blocked by UpesiPay"
    [batch] = data["batches"]
    assert (batch["id"], batch["source_name"], batch["done"], batch["payments"], batch["progress_pct"]) == (
        seeded_web.batch_id,
        BATCH_NAME,
        seeded_web.batch_done,
        seeded_web.batch_payments,
        50.0,
    )


def test_dashboard_never_shows_a_full_number(seeded_web: SeededWeb) -> None:
    page = httpx.get(seeded_web.url + "/dashboard", timeout=10).text
    data = httpx.get(seeded_web.url + "/dashboard/data", timeout=10).text
    for phone in (PHONE_STREAK, PHONE_PROVIDER_BLOCK):
        assert phone not in page and phone not in data and phone[3:] not in page


def test_chromium_renders_the_real_numbers_and_refreshes(
    chromium: str, profile: Path, seeded_web: SeededWeb
) -> None:
    # Given the dashboard refreshing every second, run for three seconds of virtual time
    dom = rendered_dom(chromium, profile, seeded_web.url + "/dashboard?every=1", budget_ms=3500)
    # Then the script rendered the guard's and the ledger's numbers
    assert cell(dom, "failures") == str(seeded_web.failures_in_window)
    assert cell(dom, "limit") == str(FAILURE_LIMIT)
    assert cell(dom, "in-flight") == str(seeded_web.in_flight)
    assert cell(dom, "headroom") == str(seeded_web.headroom)
    assert cell(dom, "payments-total") == str(sum(seeded_web.by_state.values()))
    for state, count in seeded_web.by_state.items():
        assert re.search(rf'data-state="{state}"><td>{state}</td><td class="n">{count}</td>', dom), state
    assert "Account restricted until" in dom and "Sending paused for" in dom
    for masked in seeded_web.blocked_masked:
        assert masked in dom
    assert PHONE_STREAK not in dom and PHONE_PROVIDER_BLOCK not in dom
    assert BATCH_NAME in dom and "2 / 4 settled" in dom and "50%" in dom
    # And it fetched /dashboard/data by itself, more than once
    refreshes = int(re.search(r'data-refreshes="(\d+)"', dom).group(1))  # type: ignore[union-attr]
    assert refreshes >= 2
    assert "updated " in cell(dom, "status")


def test_chromium_screenshot_shows_a_rendered_page(
    chromium: str, profile: Path, seeded_web: SeededWeb
) -> None:
    shot = profile.parent / "dashboard.png"
    result = headless(
        chromium, profile, "--virtual-time-budget=1500", f"--screenshot={shot}", seeded_web.url + "/dashboard"
    )
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    width, height, pixels = read_png(shot.read_bytes())
    assert (width, height) == WINDOW
    # A rendered page: the dark header band at the top, light cards below, and text in between (many colours).
    header = pixels[20][width // 2]
    body = pixels[height - 20][width - 20]
    assert sum(header[:3]) < 200 and sum(body[:3]) > 600, (header, body)
    colours = {pixels[y][x][:3] for y in range(0, height, 7) for x in range(0, width, 7)}
    assert len(colours) > 40


def read_png(data: bytes) -> tuple[int, int, list[list[tuple[int, ...]]]]:
    """Decode an 8-bit RGB or RGBA, non-interlaced PNG (what Chromium writes) into rows of pixel tuples."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    offset, chunks, header = 8, [], b""
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            chunks.append(body)
        offset += 12 + length
    width, height, depth, colour_type, _c, _f, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and colour_type in (2, 6) and interlace == 0
    channels = 4 if colour_type == 6 else 3
    raw = zlib.decompress(b"".join(chunks))
    stride = width * channels
    rows: list[list[tuple[int, ...]]] = []
    previous = bytearray(stride)
    position = 0
    for _ in range(height):
        filter_type = raw[position]
        line = bytearray(raw[position + 1 : position + 1 + stride])
        position += 1 + stride
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = previous[i]
            up_left = previous[i - channels] if i >= channels else 0
            if filter_type == 1:
                line[i] = (line[i] + left) & 0xFF
            elif filter_type == 2:
                line[i] = (line[i] + up) & 0xFF
            elif filter_type == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif filter_type == 4:
                estimate = left + up - up_left
                pa, pb, pc = abs(estimate - left), abs(estimate - up), abs(estimate - up_left)
                predictor = left if pa <= pb and pa <= pc else up if pb <= pc else up_left
                line[i] = (line[i] + predictor) & 0xFF
        rows.append([tuple(line[x : x + channels]) for x in range(0, stride, channels)])
        previous = line
    return width, height, rows


def test_chromium_draws_the_failure_window_chart_from_the_ledger(
    chromium: str, profile: Path, seeded_web: SeededWeb
) -> None:
    from datetime import timedelta

    from sqlalchemy import delete
    from sqlmodel import col, select

    from worker.ledger import AttemptOutcome, Payment, SendAttempt, make_engine, session_scope, utcnow

    # Given five failures in the ledger's window: two 5 h ago, three 1 h ago
    engine = make_engine(seeded_web.env["DATABASE_URL"])
    now = utcnow()
    ids = [f"chart{n}.x" for n in range(5)]
    with session_scope(engine) as session:
        payment_id = session.exec(select(Payment.id).where(Payment.account == seeded_web.account)).first()
        assert payment_id is not None
        for n, attempt_id in enumerate(ids):
            at = now - timedelta(hours=5 if n < 2 else 1)
            session.add(
                SendAttempt(
                    id=attempt_id,
                    payment_id=payment_id,
                    account=seeded_web.account,
                    number=100 + n,
                    outcome=AttemptOutcome.FAILURE,
                    outcome_at=at,
                    guard_resolved_at=at,
                )
            )
        session.commit()
    try:
        data = httpx.get(seeded_web.url + "/dashboard/data", timeout=10).json()
        points = [point["failures"] for point in data["chart"]["points"]]
        assert len(points) == 73 and points[0] == 0 and points[-1] == 5 and max(points) == 5
        assert 2 in points  # between the two groups of failures
        assert (data["chart"]["limit"], data["chart"]["bulk_budget"]) == (FAILURE_LIMIT, FAILURE_LIMIT - 10)
        # When Chromium renders the page
        dom = rendered_dom(chromium, profile, seeded_web.url + "/dashboard", budget_ms=1500)
        # Then the chart is drawn in the page itself: 73 points, the limit line above the bulk lane's
        svg = re.search(r'<svg id="failure-chart"[^>]*data-points="73"[^>]*>(.*?)</svg>', dom, re.S)
        assert svg, "no chart"
        line = re.search(r'id="chart-line"[^>]*points="([^"]+)"', svg.group(1))
        assert line
        ys = [float(pair.split(",")[1]) for pair in line.group(1).split()]
        assert len(ys) == 73 and ys[-1] < ys[0]  # more failures now than 6 h ago: higher on the chart
        limit_y = float(re.search(r'id="chart-limit"[^>]*y1="([\d.]+)"', svg.group(1)).group(1))  # type: ignore[union-attr]
        reserve_y = float(re.search(r'id="chart-reserve"[^>]*y1="([\d.]+)"', svg.group(1)).group(1))  # type: ignore[union-attr]
        assert limit_y < reserve_y < ys[0]
        assert "http" not in svg.group(1)  # nothing fetched from elsewhere
        assert cell(dom, "next-free").startswith((now + timedelta(hours=1)).isoformat()[:13])
    finally:
        with session_scope(engine) as session:
            session.exec(delete(SendAttempt).where(col(SendAttempt.id).in_(ids)))  # type: ignore[call-overload]
            session.commit()
        engine.dispose()
