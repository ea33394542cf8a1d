"""Access per account through the real FastAPI app on a SQLite ledger: a key of account A creates and sees only
A's payments and batches (404 for B's, 403 creating for B), admin keys and the accounts routes, and the callback
receiver refusing an attempt that came in on another account's URL. The broker is away (nothing is queued)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.support import account_ledger
from worker import runtime
from worker.accounts import add_account
from worker.attempts import claim_for_send
from worker.ledger import Batch, Payment, find_by_reference, session_scope
from worker.signing import account_attempt_signature, attempt_callback_url, attempt_signature
from worker.web import create_app

A_KEY, B_KEY, ENV_KEY, ADMIN_KEY = "key_alpha_1234", "key_bravo_1234", "key_env_1234", "key_admin_1234"
SECRET = "s" * 32


@pytest.fixture(autouse=True)
def ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for _ in account_ledger(
        tmp_path,
        monkeypatch,
        CALLBACK_SECRET=SECRET,
        API_KEYS=f"{ENV_KEY},alpha:{A_KEY},bravo:{B_KEY},*:{ADMIN_KEY}",
        BATCH_DIR=str(tmp_path / "batches"),
    ):
        add_account(runtime.engine(), runtime.settings(), "alpha", [7001], "tok_alpha_value")
        add_account(runtime.engine(), runtime.settings(), "bravo", [8001, 8002], "tok_bravo_value")
        yield


@pytest.fixture
def client() -> TestClient:
    return TestClient(create_app())  # no lifespan: the schema is made by the fixture


def key(value: str) -> dict[str, str]:
    return {"X-API-Key": value}


def payment(client: TestClient, api_key: str, reference: str, **extra: object) -> dict[str, object]:
    body = {"amount": 100, "phone_number": "0712345678", "external_reference": reference, **extra}
    answer = client.post("/payments", json=body, headers=key(api_key))
    assert answer.status_code == 201, answer.text
    result: dict[str, object] = answer.json()
    return result


def test_a_key_creates_payments_of_its_own_account_with_its_channel(client: TestClient) -> None:
    created = payment(client, B_KEY, "INV-B1")
    assert created["account"] == "bravo"
    stored = find_by_reference(runtime.engine(), "bravo", "INV-B1")
    assert stored is not None and stored.channel_id == 8001


def test_a_key_gets_403_creating_a_payment_for_another_account_and_nothing_is_recorded(
    client: TestClient,
) -> None:
    answer = client.post(
        "/payments",
        json={"amount": 100, "phone_number": "0712345678", "external_reference": "INV-X", "account": "bravo"},
        headers=key(A_KEY),
    )
    assert answer.status_code == 403
    assert answer.json()["errors"] == [{"field": "account", "rule": "must be the API key's own account"}]
    assert find_by_reference(runtime.engine(), "bravo", "INV-X") is None
    assert find_by_reference(runtime.engine(), "alpha", "INV-X") is None


def test_a_key_gets_404_for_another_accounts_payment(client: TestClient) -> None:
    payment(client, B_KEY, "INV-B2")
    assert client.get("/payments/INV-B2", headers=key(A_KEY)).status_code == 404
    assert client.get("/payments/INV-B2?account=bravo", headers=key(A_KEY)).status_code == 403
    assert client.get("/payments/INV-B2", headers=key(ENV_KEY)).status_code == 404
    own = client.get("/payments/INV-B2", headers=key(B_KEY))
    assert own.status_code == 200 and own.json()["account"] == "bravo"


def test_the_same_reference_in_two_accounts_is_two_payments(client: TestClient) -> None:
    first, second = payment(client, A_KEY, "INV-SAME"), payment(client, B_KEY, "INV-SAME")
    assert first["id"] != second["id"]
    assert client.get("/payments/INV-SAME", headers=key(A_KEY)).json()["id"] == first["id"]


def test_an_admin_key_names_the_account_and_defaults_to_the_environments(client: TestClient) -> None:
    created = payment(client, ADMIN_KEY, "INV-ADM", account="bravo")
    assert created["account"] == "bravo"
    assert client.get("/payments/INV-ADM?account=bravo", headers=key(ADMIN_KEY)).status_code == 200
    assert client.get("/payments/INV-ADM", headers=key(ADMIN_KEY)).status_code == 404
    assert payment(client, ADMIN_KEY, "INV-ENV")["account"] == "acct-env"


def test_a_channel_outside_the_account_and_an_unknown_account_are_422(client: TestClient) -> None:
    body = {"amount": 100, "phone_number": "0712345678", "external_reference": "INV-C", "channel_id": 7001}
    answer = client.post("/payments", json=body, headers=key(B_KEY))
    assert answer.status_code == 422 and answer.json()["errors"][0]["field"] == "channel_id"
    answer = client.post("/payments", json={**body, "account": "nobody"}, headers=key(ADMIN_KEY))
    assert answer.status_code == 422 and answer.json()["errors"][0]["field"] == "account"
    answer = client.post("/payments", json={**body, "account": 5}, headers=key(ADMIN_KEY))
    assert answer.status_code == 422 and answer.json()["errors"][0]["field"] == "account"


def batch_of(account: str) -> str:
    batch = Batch(account=account, source_name="b.csv")
    with session_scope(runtime.engine()) as session:
        session.add(batch)
        session.commit()
    return batch.id


def test_batches_of_another_account_are_404_on_every_route(client: TestClient) -> None:
    batch_id = batch_of("bravo")
    assert client.get(f"/batches/{batch_id}", headers=key(A_KEY)).status_code == 404
    assert client.post(f"/batches/{batch_id}/resume", headers=key(A_KEY)).status_code == 404
    assert client.get(f"/batches/{batch_id}/rejects", headers=key(A_KEY)).status_code == 404
    assert client.get(f"/batches/{batch_id}", headers=key(B_KEY)).status_code == 200
    assert client.get(f"/batches/{batch_id}?account=bravo", headers=key(ADMIN_KEY)).status_code == 200


def test_a_key_gets_403_uploading_a_batch_for_another_account(client: TestClient) -> None:
    csv = b"external_reference,phone_number,amount\nR1,0712345678,100\n"
    refused = client.post(
        "/batches?account=bravo", content=csv, headers={**key(A_KEY), "Content-Type": "text/csv"}
    )
    assert refused.status_code == 403
    with session_scope(runtime.engine()) as session:
        assert session.query(Batch).count() == 0
    accepted = client.post("/batches", content=csv, headers={**key(B_KEY), "Content-Type": "text/csv"})
    assert accepted.status_code == 202
    with session_scope(runtime.engine()) as session:
        assert session.get(Batch, accepted.json()["batch_id"]).account == "bravo"  # type: ignore[union-attr]


def test_the_accounts_routes_need_an_admin_key_and_never_show_a_token(client: TestClient) -> None:
    assert client.get("/accounts", headers=key(A_KEY)).status_code == 403
    body = {"name": "charlie", "channel_ids": [9001], "token": "tok_charlie_value"}
    assert client.post("/accounts", json=body, headers=key(B_KEY)).status_code == 403
    created = client.post("/accounts", json=body, headers=key(ADMIN_KEY))
    assert created.status_code == 201 and "tok_charlie_value" not in created.text
    listed = client.get("/accounts", headers=key(ADMIN_KEY))
    assert [view["name"] for view in listed.json()] == ["acct-env", "alpha", "bravo", "charlie"]
    assert "tok_" not in listed.text
    too_high = client.patch("/accounts/charlie", json={"account_failure_limit": 51}, headers=key(ADMIN_KEY))
    assert too_high.status_code == 422 and too_high.json()["errors"][0]["field"] == "account_failure_limit"
    assert (
        client.patch("/accounts/nobody", json={"disabled": True}, headers=key(ADMIN_KEY)).status_code == 404
    )
    disabled = client.patch("/accounts/charlie", json={"disabled": True}, headers=key(ADMIN_KEY))
    assert disabled.status_code == 200 and disabled.json()["disabled"] is True
    bad = client.post("/accounts", json={**body, "name": "delta", "token": "a b"}, headers=key(ADMIN_KEY))
    assert bad.status_code == 422 and "a b" not in bad.text


def sent_attempt(account: str, reference: str) -> tuple[Payment, str]:
    row = Payment(
        account=account, external_reference=reference, phone="254712345678", amount=100, channel_id=7001
    )
    with session_scope(runtime.engine()) as session:
        session.add(row)
        session.commit()
    token = f"{row.id}.abcd1234"
    assert claim_for_send(runtime.engine(), row.id, token)
    return row, token


CALLBACK = {
    "forward_url": "",
    "status": True,
    "response": {
        "Amount": 100,
        "CheckoutRequestID": "ws_CO_1",
        "ExternalReference": "INV-OK",
        "MerchantRequestID": "3202-70921557-1",
        "MpesaReceiptNumber": "SAE3YULR0Y",
        "Phone": "+254712345678",
        "ResultCode": 0,
        "ResultDesc": "The service request is processed successfully.",
        "Status": "Success",
    },
}


def test_a_stored_accounts_callback_url_names_the_account() -> None:
    url = attempt_callback_url(runtime.settings(), "p1.abcd", "alpha")
    assert "/callbacks/upesipay/accounts/alpha/attempts/p1.abcd/" in url
    assert "/callbacks/upesipay/attempts/p1.abcd/" in attempt_callback_url(runtime.settings(), "p1.abcd")


def test_a_callback_is_refused_when_its_attempt_is_not_the_urls_accounts(client: TestClient) -> None:
    _, token = sent_attempt("alpha", "INV-CB")
    # Signed for bravo, but the attempt is alpha's: answered as unknown, nothing settled.
    bravo_sig = account_attempt_signature(SECRET, "bravo", token)
    answer = client.post(f"/callbacks/upesipay/accounts/bravo/attempts/{token}/{bravo_sig}", json=CALLBACK)
    assert answer.status_code == 404
    # alpha's URL with bravo in the path: the signature does not match.
    alpha_sig = account_attempt_signature(SECRET, "alpha", token)
    answer = client.post(f"/callbacks/upesipay/accounts/bravo/attempts/{token}/{alpha_sig}", json=CALLBACK)
    assert answer.status_code == 403
    # The environment account's old URL shape does not reach a stored account's attempt either.
    old_sig = attempt_signature(SECRET, token)
    assert client.post(f"/callbacks/upesipay/attempts/{token}/{old_sig}", json=CALLBACK).status_code == 404
    stored = find_by_reference(runtime.engine(), "alpha", "INV-CB")
    assert stored is not None and stored.state.value == "SENDING"


def test_a_callback_on_its_own_accounts_url_reaches_the_receiver(client: TestClient) -> None:
    _, token = sent_attempt("alpha", "INV-OK")
    sig = account_attempt_signature(SECRET, "alpha", token)
    answer = client.post(
        f"/callbacks/upesipay/accounts/alpha/attempts/{token}/{sig}", content=json.dumps(CALLBACK).encode()
    )
    # Past the account check: the receiver holds it (UpesiPay's 201 is not recorded yet).
    assert answer.status_code == 202, answer.text


def test_every_callback_url_shape_has_its_signature_redacted_in_logs() -> None:
    from worker.logs import Redactor

    redactor = Redactor()
    for url in (
        attempt_callback_url(runtime.settings(), "p1.abcd", "alpha"),
        attempt_callback_url(runtime.settings(), "p1.abcd"),
    ):
        signature = url.rsplit("/", 1)[1]
        text = redactor.redact(f"POST {url} 200")
        assert signature not in text and "p1.abcd/[signature]" in text


def test_the_dashboard_switches_between_accounts(client: TestClient) -> None:
    payment(client, B_KEY, "INV-DASH")
    data = client.get("/dashboard/data?account=bravo").json()
    assert data["account"] == "bravo" and data["accounts"] == ["acct-env", "alpha", "bravo"]
    assert data["payments_total"] == 1
    assert client.get("/dashboard/data").json()["payments_total"] == 0  # the environment's account
    assert client.get("/dashboard/data?account=nobody").status_code == 404
    page = client.get("/dashboard?account=bravo")
    assert (
        page.status_code == 200 and 'id="account-switch"' in page.text and '"account": "bravo"' in page.text
    )


def test_a_stored_accounts_own_api_key_acts_for_it_only(client: TestClient) -> None:
    body = {"name": "charlie", "channel_ids": [9001], "token": "tok_charlie_value"}
    created = client.post("/accounts", json=body, headers=key(ADMIN_KEY)).json()
    charlie_key = created["api_key"]
    assert payment(client, charlie_key, "INV-CH")["account"] == "charlie"
    assert client.get("/payments/INV-CH", headers=key(charlie_key)).status_code == 200
    refused = client.post(
        "/payments",
        json={
            "amount": 100,
            "phone_number": "0712345678",
            "external_reference": "INV-CX",
            "account": "bravo",
        },
        headers=key(charlie_key),
    )
    assert refused.status_code == 403
    assert client.get("/accounts", headers=key(charlie_key)).status_code == 403
    assert "api_key" not in client.get("/accounts", headers=key(ADMIN_KEY)).text
    # Disabled: its key no longer opens anything.
    client.patch("/accounts/charlie", json={"disabled": True}, headers=key(ADMIN_KEY))
    assert client.get("/payments/INV-CH", headers=key(charlie_key)).status_code == 401
