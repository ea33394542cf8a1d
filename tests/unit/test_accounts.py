"""Accounts as data on a real SQLite ledger: tokens encrypted at rest and never shown, limits never above the
provider's, key rotation, the environment's account unchanged, and `stkpush account` reading tokens safely."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlmodel import select

from tests.support import account_ledger
from worker import runtime
from worker.accounts import (
    AccountError,
    UnknownAccount,
    add_account,
    list_accounts,
    load_account,
    rotate_key,
    update_account,
)
from worker.cli import main
from worker.ledger import Account, session_scope
from worker.secrets_box import TokenBox, TokenKeyError, generate_key

KEY = generate_key()
TOKEN = "tok_acme_" + "x" * 20


@pytest.fixture(autouse=True)
def ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    yield from account_ledger(tmp_path, monkeypatch, ACCOUNT_TOKEN_KEY=KEY, ACCOUNT_CACHE_S="0")


def stored_row(name: str) -> Account:
    with session_scope(runtime.engine()) as session:
        row = session.exec(select(Account).where(Account.name == name)).one()
    return row


def test_token_is_stored_encrypted_and_never_listed() -> None:
    view = add_account(runtime.engine(), runtime.settings(), "acme", [7001, 7002], TOKEN)
    row = stored_row("acme")
    assert TOKEN not in row.token_ciphertext and TOKEN not in json.dumps(view)
    assert TokenBox(KEY).decrypt(row.token_ciphertext) == TOKEN
    assert TOKEN not in json.dumps(list_accounts(runtime.engine(), runtime.settings()))
    config = runtime.account("acme")
    assert config.token.get_secret_value() == TOKEN and TOKEN not in repr(config)
    assert config.default_channel == 7001 and config.allows_channel(7002) and not config.allows_channel(2133)


@pytest.mark.parametrize(
    ("limits", "field"),
    [
        ({"phone_streak_limit": 11}, "phone_streak_limit"),
        ({"account_failure_limit": 51}, "account_failure_limit"),
        ({"account_failure_limit": 0}, "account_failure_limit"),
        ({"account_failure_limit": 10, "interactive_reserve": 10}, "interactive_reserve"),
        ({"bulk_max_inflight": True}, "bulk_max_inflight"),
        ({"colour": 1}, "colour"),
    ],
)
def test_limits_above_the_providers_are_refused_naming_the_field(limits: dict[str, int], field: str) -> None:
    with pytest.raises(AccountError) as refused:
        add_account(runtime.engine(), runtime.settings(), "acme", [7001], TOKEN, limits)
    assert refused.value.field == field
    assert load_account(runtime.engine(), runtime.settings(), "acme") is None  # nothing stored


@pytest.mark.parametrize(
    ("name", "channels", "token", "field"),
    [
        ("acme corp", [7001], TOKEN, "name"),
        ("acct-env", [7001], TOKEN, "name"),  # the environment's account is the settings'
        ("acme", [], TOKEN, "channel_ids"),
        ("acme", [0], TOKEN, "channel_ids"),
        ("acme", [7001, 7001], TOKEN, "channel_ids"),
        ("acme", [7001], "has a space", "token"),
        ("acme", [7001], "", "token"),
    ],
)
def test_bad_account_input_is_refused_and_never_echoes_the_token(
    name: str, channels: list[int], token: str, field: str
) -> None:
    with pytest.raises(AccountError) as refused:
        add_account(runtime.engine(), runtime.settings(), name, channels, token)
    assert refused.value.field == field
    assert token not in str(refused.value) or not token


def test_a_taken_name_is_refused() -> None:
    add_account(runtime.engine(), runtime.settings(), "acme", [7001], TOKEN)
    with pytest.raises(AccountError, match="already taken"):
        add_account(runtime.engine(), runtime.settings(), "acme", [7002], TOKEN)


def test_account_limits_override_the_settings_in_its_guard_only() -> None:
    add_account(runtime.engine(), runtime.settings(), "acme", [7001], TOKEN, {"account_failure_limit": 20})
    assert runtime.guard("acme").limits.account_failure_limit == 20
    assert runtime.guard().limits.account_failure_limit == runtime.settings().account_failure_limit
    assert runtime.guard("acme").account == "acme" and runtime.guard().account == "acct-env"


def test_environment_account_is_the_default_and_reads_no_row() -> None:
    config = runtime.account()
    assert config.name == "acct-env" and config.from_environment
    assert config.token.get_secret_value() == "tok_env_account_value" and config.channel_ids == (2133,)
    assert runtime.accounts() == ["acct-env"]
    with pytest.raises(UnknownAccount):
        runtime.account("nobody")


def test_set_changes_token_and_limits_and_disable_hides_it_from_beat() -> None:
    add_account(runtime.engine(), runtime.settings(), "acme", [7001], TOKEN)
    update_account(
        runtime.engine(), runtime.settings(), "acme", token="tok_new_value", limits={"phone_streak_limit": 5}
    )
    config = runtime.account("acme")
    assert config.token.get_secret_value() == "tok_new_value" and config.phone_streak_limit == 5
    update_account(runtime.engine(), runtime.settings(), "acme", limits={"phone_streak_limit": None})
    assert runtime.account("acme").phone_streak_limit is None
    update_account(runtime.engine(), runtime.settings(), "acme", disabled=True)
    assert runtime.account("acme").disabled and runtime.accounts() == ["acct-env"]
    with pytest.raises(UnknownAccount):
        update_account(runtime.engine(), runtime.settings(), "nobody", disabled=True)


def test_rotate_key_reencrypts_every_token_so_the_old_key_can_be_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    add_account(runtime.engine(), runtime.settings(), "acme", [7001], TOKEN)
    new = generate_key()
    monkeypatch.setenv("ACCOUNT_TOKEN_KEY", f"{new},{KEY}")
    runtime.reset()
    assert rotate_key(runtime.engine(), runtime.settings()) == 1
    monkeypatch.setenv("ACCOUNT_TOKEN_KEY", new)  # the old key dropped
    runtime.reset()
    assert runtime.account("acme").token.get_secret_value() == TOKEN
    with pytest.raises(TokenKeyError, match="no key decrypts"):
        TokenBox(KEY).decrypt(stored_row("acme").token_ciphertext)


@pytest.mark.parametrize(
    "keys", ["", "not-a-fernet-key", f"{KEY},short"], ids=["missing", "malformed", "good-then-short"]
)
def test_a_missing_or_malformed_key_is_refused_without_quoting_it(keys: str) -> None:
    with pytest.raises(TokenKeyError, match="ACCOUNT_TOKEN_KEY") as refused:
        TokenBox(keys)
    assert "not-a-fernet-key" not in str(refused.value) and "short" not in str(refused.value)


def test_cli_add_reads_the_token_from_stdin_and_list_never_shows_it() -> None:
    runner = CliRunner()
    added = runner.invoke(main, ["account", "add", "acme", "--channels", "7001,7002"], input=TOKEN + "\n")
    assert added.exit_code == 0, added.output
    assert TOKEN not in added.output
    listed = runner.invoke(main, ["account", "list"])
    assert listed.exit_code == 0 and TOKEN not in listed.output
    names = [json.loads(line)["name"] for line in listed.output.splitlines()]
    assert names == ["acct-env", "acme"]
    assert runtime.account("acme").token.get_secret_value() == TOKEN


def test_cli_refuses_a_limit_above_the_providers_and_stores_nothing() -> None:
    refused = CliRunner().invoke(
        main, ["account", "add", "acme", "--channels", "7001", "--account-failure-limit", "60"], input=TOKEN
    )
    assert refused.exit_code != 0 and "account_failure_limit: must be at most 50" in refused.output
    assert load_account(runtime.engine(), runtime.settings(), "acme") is None


def test_cli_disable_then_enqueue_for_it_is_refused_naming_account() -> None:
    from producers import PaymentValidationError, enqueue_payment

    add_account(runtime.engine(), runtime.settings(), "acme", [7001], TOKEN)
    assert CliRunner().invoke(main, ["account", "disable", "acme"]).exit_code == 0
    with pytest.raises(PaymentValidationError) as refused:
        enqueue_payment(100, "0712345678", "INV-1", account="acme")
    assert [error.field for error in refused.value.errors] == ["account"]
    with pytest.raises(PaymentValidationError) as unknown:
        enqueue_payment(100, "0712345678", "INV-1", account="nobody")
    assert "is not a configured account" in str(unknown.value)


def test_a_bulk_turn_goes_to_another_accounts_batch_with_fewer_sends_in_flight() -> None:
    from worker import bulk_turns
    from worker.ledger import Batch, Payment, PaymentState

    add_account(runtime.engine(), runtime.settings(), "acme", [7001], TOKEN)
    big, small = (
        Batch(account="acct-env", source_name="big.csv"),
        Batch(account="acme", source_name="small.csv"),
    )
    with session_scope(runtime.engine()) as session:
        session.add_all([big, small])
        session.commit()
        rows = [
            Payment(
                account=batch.account,
                external_reference=f"R{index}-{batch.source_name}",
                phone=f"2547120000{index:02d}",
                amount=10,
                channel_id=7001,
                queue="bulk",
                batch_id=batch.id,
                state=state,
            )
            for batch, count, state in (
                (big, 3, PaymentState.AWAITING_CALLBACK),
                (big, 3, PaymentState.PENDING),
            )
            for index in range(count)
        ] + [
            Payment(
                account="acme",
                external_reference="S1",
                phone="254713000001",
                amount=10,
                channel_id=7001,
                queue="bulk",
                batch_id=small.id,
            )
        ]
        for index, row in enumerate(rows):
            row.external_reference = f"{row.external_reference}-{index}"
        session.add_all(rows)
        session.commit()
        own = next(row for row in rows if row.batch_id == big.id and row.state == PaymentState.PENDING)
        theirs = rows[-1]
    # The big batch of the environment's account has 3 sends in flight, acme's small one none: acme's row first.
    # (Under BULK_ORDER=score, the default, acme's row is the only candidate and the message's own row waits
    # DEFERRED, due at once, for its own batch's next turn: docs/batches.md "The order".)
    assert bulk_turns.candidates(own)[0] == theirs.id


def test_cli_batch_with_account_records_its_rows_in_that_account(tmp_path: Path) -> None:
    from worker.ledger import Batch, Payment

    add_account(runtime.engine(), runtime.settings(), "acme", [7001, 7002], TOKEN)
    invoices = tmp_path / "invoices.csv"
    invoices.write_text(
        "external_reference,phone_number,amount,channel_id\nR1,0712345678,100,\nR2,0712345679,100,7002\n"
        "R3,0712345670,100,2133\n"
    )
    result = CliRunner().invoke(main, ["batch", str(invoices), "--account", "acme", "--json"])
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["rows_recorded"] == 2 and report["rows_rejected"] == 1  # 2133 is not one of acme's channels
    with session_scope(runtime.engine()) as session:
        assert session.get(Batch, report["batch_id"]).account == "acme"  # type: ignore[union-attr]
        rows = session.exec(select(Payment).order_by(Payment.external_reference)).all()
    assert [(row.account, row.channel_id) for row in rows] == [("acme", 7001), ("acme", 7002)]
    refused = CliRunner().invoke(main, ["batch", str(invoices), "--account", "nobody"])
    assert refused.exit_code == 2 and "account: is not a configured account" in refused.output
    status = CliRunner().invoke(main, ["batch-status", report["batch_id"], "--account", "acme", "--json"])
    assert status.exit_code == 0 and json.loads(status.output)["rows_recorded"] == 2
    assert (
        CliRunner().invoke(main, ["batch-status", report["batch_id"]]).exit_code == 1
    )  # not the env account's


def test_cli_add_shows_the_accounts_api_key_once_and_stores_only_its_hash() -> None:
    from worker.accounts import account_for_api_key

    added = CliRunner().invoke(main, ["account", "add", "acme", "--channels", "7001"], input=TOKEN + "\n")
    assert added.exit_code == 0, added.output
    api_key = json.loads(added.stdout.strip().splitlines()[-1])["api_key"]
    assert account_for_api_key(runtime.engine(), api_key) == "acme"
    assert stored_row("acme").api_key_hash not in (None, api_key)
    renewed = CliRunner().invoke(main, ["account", "api-key", "acme"])
    assert renewed.exit_code == 0
    assert account_for_api_key(runtime.engine(), api_key) is None  # the old key stopped working
    assert account_for_api_key(runtime.engine(), renewed.stdout.strip()) == "acme"
