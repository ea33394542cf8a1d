"""`/metrics`: state read at scrape time from the ledger and the guard, events counted in Redis by every process.

The seeded web app's numbers are known in advance; the Procfile run proves the real worker and web processes
count their pushes, latencies, guard decisions and callbacks where any web process can read them.
"""

from __future__ import annotations

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.ops.conftest import FAILURE_LIMIT, ProcfileRun, SeededWeb


def scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Samples by name, then by their sorted labels."""
    response = httpx.get(url + "/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def one(samples: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, **labels: str) -> float:
    return samples[name][tuple(sorted(labels.items()))]


def test_payments_by_state_come_from_the_ledger(seeded_web: SeededWeb) -> None:
    samples = scrape(seeded_web.url)
    by_state = {dict(labels)["state"]: value for labels, value in samples["stkpush_payments"].items()}
    assert by_state == {state: float(count) for state, count in seeded_web.by_state.items()}


def test_unknown_payments_have_a_gauge_of_their_own(seeded_web: SeededWeb) -> None:
    samples = scrape(seeded_web.url)
    assert one(samples, "stkpush_payments_unknown") == seeded_web.by_state["UNKNOWN"]


def test_deferred_backlog_and_what_is_due(seeded_web: SeededWeb) -> None:
    samples = scrape(seeded_web.url)
    assert one(samples, "stkpush_deferred_backlog") == seeded_web.by_state["DEFERRED"]
    assert one(samples, "stkpush_deferred_due") == seeded_web.deferred_due
    assert one(samples, "stkpush_deferred_oldest_due_seconds") >= 290  # seeded five minutes overdue


def test_failure_budget_headroom_and_restrictions_come_from_the_guard(seeded_web: SeededWeb) -> None:
    samples = scrape(seeded_web.url)
    assert one(samples, "stkpush_guard_failure_limit") == FAILURE_LIMIT
    assert one(samples, "stkpush_guard_failures_in_window") == seeded_web.failures_in_window
    assert one(samples, "stkpush_guard_in_flight") == seeded_web.in_flight
    assert one(samples, "stkpush_guard_headroom") == seeded_web.headroom
    assert one(samples, "stkpush_guard_restricted") == 1
    assert 800 < one(samples, "stkpush_guard_restricted_seconds") <= 900
    assert (
        one(samples, "stkpush_guard_blocked_numbers") == 1
    )  # the provider block; the streak rest is not one
    assert 500 < one(samples, "stkpush_sending_paused_seconds") <= 600
    assert all(value == 1 for value in samples["stkpush_scrape_source_up"].values())


def test_event_counters_read_what_every_process_recorded(seeded_web: SeededWeb) -> None:
    samples = scrape(seeded_web.url)
    assert one(samples, "stkpush_pushes_total", outcome="accepted") == 3
    assert one(samples, "stkpush_pushes_total", outcome="rejected") == 1
    assert one(samples, "stkpush_guard_decisions_total", decision="admitted") == 4
    assert one(samples, "stkpush_guard_decisions_total", decision="refused") == 2
    assert one(samples, "stkpush_guard_refusals_total", reason="phone_busy") == 2
    assert one(samples, "stkpush_callbacks_total", result_code="0", effect="applied") == 2
    assert one(samples, "stkpush_callbacks_total", result_code="1032", effect="duplicate") == 1
    assert one(samples, "stkpush_settlements_total", result="succeeded") == 1
    latency = "stkpush_provider_latency_seconds"
    assert one(samples, latency + "_count") == 5
    assert one(samples, latency + "_bucket", le="0.25") == 3
    assert one(samples, latency + "_bucket", le="1.0") == 4
    assert one(samples, latency + "_bucket", le="30.0") == 4
    assert one(samples, latency + "_bucket", le="+Inf") == 5
    assert abs(one(samples, latency + "_sum") - (3 * 0.2 + 0.7 + 31.0)) < 1e-6


def test_a_scrape_without_redis_still_reports_the_ledger(seeded_web: SeededWeb) -> None:
    # Given the guard's Redis refuses connections (a second web app pointed at a closed port)
    import subprocess
    import sys

    from tests.ops.conftest import spawn, stop_group, wait_http
    from worker.local.embedded_redis import free_port

    port = free_port()
    env = {**seeded_web.env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    log_path = seeded_web.log_path.with_name("web-no-redis.log")
    argv = [sys.executable, "-m", "uvicorn", "worker.web.app:create_app", "--factory", "--port", str(port)]
    process: subprocess.Popen[bytes] = spawn(argv, env, seeded_web.log_path.parent, log_path)
    try:
        wait_http(f"http://127.0.0.1:{port}/dashboard/data", 30, process, log_path)
        # When Prometheus scrapes
        samples = scrape(f"http://127.0.0.1:{port}")
    finally:
        stop_group(process)
    # Then the ledger's numbers are there and the guard and counters say they could not be read
    assert one(samples, "stkpush_payments", state="SUCCEEDED") == seeded_web.by_state["SUCCEEDED"]
    assert one(samples, "stkpush_scrape_source_up", source="ledger") == 1
    assert one(samples, "stkpush_scrape_source_up", source="guard") == 0
    assert one(samples, "stkpush_scrape_source_up", source="counters") == 0
    assert "stkpush_guard_headroom" not in samples


def test_a_real_run_counts_pushes_latency_decisions_and_callbacks(procfile_run: ProcfileRun) -> None:
    samples = scrape(procfile_run.web_url)
    pushes = {dict(labels)["outcome"]: value for labels, value in samples["stkpush_pushes_total"].items()}
    assert pushes == {"accepted": 5, "rejected": 1}
    assert one(samples, "stkpush_provider_latency_seconds_count") == 6
    assert one(samples, "stkpush_guard_decisions_total", decision="admitted") == 6
    callbacks = {
        (dict(labels)["result_code"], dict(labels)["effect"]): value
        for labels, value in samples["stkpush_callbacks_total"].items()
    }
    assert callbacks == {("0", "applied"): 2, ("1032", "applied"): 1, ("1", "applied"): 1}
    assert one(samples, "stkpush_settlements_total", result="failed") == 1  # the lost callback
    assert one(samples, "stkpush_payments", state="SUCCEEDED") == 2
    assert one(samples, "stkpush_guard_in_flight") == 0


def test_counters_live_under_the_accounts_keys_with_a_ttl(procfile_run: ProcfileRun) -> None:
    client = redis.Redis.from_url(procfile_run.env["REDIS_URL"])
    try:
        keys = list(client.scan_iter(match=f"stkpush:{{{procfile_run.env['UPESIPAY_ACCOUNT']}}}:m:*"))
        assert keys
        assert all(client.ttl(key) > 0 for key in keys)
    finally:
        client.close()
