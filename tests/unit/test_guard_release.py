"""`stkpush guard release`: an operator frees a number held at its streak limit. The release is in the ledger,
so a guard rebuilt after Redis forgets keeps it; the number's waiting payments are due at once."""

from __future__ import annotations

from datetime import timedelta

from click.testing import CliRunner

from tests.unit.test_sending import FAILED_STATUS, Provider, new_payment, provider, reload
from worker import reconcile, runtime
from worker.cli import main
from worker.ledger import PhoneRelease, session_scope, utcnow
from worker.sending import SendResult, send_payment
from worker.settlement import settle_from_status

__all__ = ["provider"]  # the fixture, imported for this module's tests

PHONE = "254712345678"


def hold_the_number(limit: int = 10) -> None:
    """`limit` prompts to one number, each settled as failed: the number is at its streak limit."""
    for index in range(limit):
        payment = new_payment(f"HELD-{index}", PHONE)
        assert send_payment(payment.id)[0] == SendResult.ACCEPTED
        assert settle_from_status(reload(payment), FAILED_STATUS) == "failed"
    assert runtime.guard().phone_snapshot(PHONE).held


def test_a_held_number_waits_until_released_and_the_release_survives_a_rebuild(provider: Provider) -> None:
    # Given a number at its limit and one more payment to it, deferred as blocked, with no end in sight
    hold_the_number()
    waiting = new_payment("HELD-NEXT", PHONE)
    assert send_payment(waiting.id)[0] == SendResult.DEFERRED
    deferred = reload(waiting)
    assert (deferred.reason or "").startswith("guard: phone_blocked")
    assert deferred.next_attempt_at is not None and deferred.next_attempt_at > utcnow() + timedelta(days=365)
    # When an operator releases it
    result = CliRunner().invoke(main, ["guard", "release", "0712345678", "--by", "ops-jane"])
    assert result.exit_code == 0, result.output
    assert "released 2547****678: 1 waiting payments due now" in result.output
    assert PHONE not in result.output
    # Then its streak starts afresh, the waiting payment is due now, and the ledger says who released it
    assert runtime.guard().phone_snapshot(PHONE).streak == 0
    assert reload(waiting).next_attempt_at <= utcnow()  # type: ignore[operator]
    with session_scope(runtime.engine()) as session:
        (release,) = session.query(PhoneRelease).all()
    assert (release.phone, release.released_by) == (PHONE, "ops-jane")
    # And a guard rebuilt from the ledger alone keeps the release (without it, the ten failures hold it again)
    assert reconcile.rebuild_guard(force=True)
    assert runtime.guard().phone_snapshot(PHONE).streak == 0
    assert runtime.guard().admit(PHONE, "after-release").admitted


def test_a_rebuild_without_a_release_keeps_the_number_held(provider: Provider) -> None:
    hold_the_number()
    assert reconcile.rebuild_guard(force=True)
    snapshot = runtime.guard().phone_snapshot(PHONE)
    assert snapshot.held and snapshot.streak == 10


def test_release_refuses_a_bad_number_or_an_empty_name_and_records_nothing(provider: Provider) -> None:
    for args in (
        ["guard", "release", "12345", "--by", "ops"],
        ["guard", "release", "0712345678", "--by", " "],
    ):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2
        assert "PHONE" in result.output or "--by" in result.output
    with session_scope(runtime.engine()) as session:
        assert session.query(PhoneRelease).count() == 0
