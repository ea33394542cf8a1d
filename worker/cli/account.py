"""`stkpush account add|list|set|disable|enable|rotate-key|new-key`: the UpesiPay accounts of a deployment
(worker/accounts.py, docs/operations.md "Adding a merchant").

A token is never an argument (argv shows in `ps` and shell history): it is read from --token-env's variable, or
from stdin when piped, or from a hidden prompt. Nothing prints a token.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from worker.accounts import LIMIT_FIELDS


def _fail(message: str) -> None:
    raise click.ClickException(message)


def _read_token(token_env: str | None) -> str:
    if token_env:
        value = os.environ.get(token_env)
        if not value:
            _fail(f"--token-env: the variable {token_env} is not set or empty")
        return (value or "").strip()
    if not sys.stdin.isatty():
        return sys.stdin.readline().strip()
    prompted: str = click.prompt("UpesiPay token", hide_input=True)
    return prompted.strip()


def _channels(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        _fail("--channels: must be comma-separated channel ids (digits)")
        return None


def _limit_options(function: Any) -> Any:
    for name in reversed(LIMIT_FIELDS):
        option = "--" + name.replace("_", "-")
        function = click.option(
            option, name, type=int, default=None, help=f"Its own {name} (default: the setting)."
        )(function)
    return function


def _context() -> tuple[Any, Any]:
    from worker import runtime

    return runtime.engine(), runtime.settings()


@click.group("account")
def account_command() -> None:
    """UpesiPay accounts: one per merchant, each with its own channels, limits and token."""


@account_command.command("add")
@click.argument("name")
@click.option("--channels", required=True, help="Comma-separated channel ids; the first is the default.")
@click.option("--token-env", default=None, help="Read the token from this environment variable.")
@click.option("--api-key/--no-api-key", "with_key", default=True, help="Also make its API key (shown once).")
@_limit_options
def add(name: str, channels: str, token_env: str | None, with_key: bool, **limits: int | None) -> None:
    """Add account NAME. The token comes from --token-env, stdin, or a hidden prompt. Prints the account and
    (unless --no-api-key) its own API key, shown this once."""
    from worker.accounts import AccountError, add_account, new_api_key

    engine, settings = _context()
    token = _read_token(token_env)
    try:
        view = add_account(
            engine,
            settings,
            name,
            _channels(channels),
            token,
            {key: value for key, value in limits.items() if value is not None},
        )
    except AccountError as error:
        _fail(str(error))
        return
    if with_key:
        view["api_key"] = new_api_key(engine, settings, name)
        click.echo(
            "Keep the API key: it is shown only now (`stkpush account api-key` makes a new one).", err=True
        )
    click.echo(json.dumps(view))


@account_command.command("api-key")
@click.argument("name")
def api_key(name: str) -> None:
    """Make a new API key for account NAME (the old one stops working); shown this once."""
    from worker.accounts import AccountError, new_api_key

    engine, settings = _context()
    try:
        click.echo(new_api_key(engine, settings, name))
    except AccountError as error:
        _fail(str(error))


@account_command.command("list")
def list_command() -> None:
    """Every account, the environment's first (never a token)."""
    from worker.accounts import list_accounts

    engine, settings = _context()
    for view in list_accounts(engine, settings):
        click.echo(json.dumps(view))


@account_command.command("set")
@click.argument("name")
@click.option("--channels", default=None, help="Comma-separated channel ids; the first is the default.")
@click.option("--token", "new_token", is_flag=True, help="Replace the token (read like `add` reads it).")
@click.option("--token-env", default=None, help="With --token: read it from this environment variable.")
@click.option(
    "--clear", "cleared", multiple=True, type=click.Choice(LIMIT_FIELDS), help="Back to the setting."
)
@_limit_options
def set_command(
    name: str,
    channels: str | None,
    new_token: bool,
    token_env: str | None,
    cleared: tuple[str, ...],
    **limits: int | None,
) -> None:
    """Change account NAME's channels, token or limits; workers see it within ACCOUNT_CACHE_S (10 s)."""
    from worker.accounts import AccountError, update_account

    engine, settings = _context()
    changed: dict[str, int | None] = {key: value for key, value in limits.items() if value is not None}
    changed.update({key: None for key in cleared})
    token = _read_token(token_env) if new_token or token_env else None
    try:
        view = update_account(
            engine, settings, name, channel_ids=_channels(channels), token=token, limits=changed
        )
    except AccountError as error:
        _fail(str(error))
        return
    click.echo(json.dumps(view))


def _enabled(name: str, disabled: bool) -> None:
    from worker.accounts import AccountError, update_account

    engine, settings = _context()
    try:
        click.echo(json.dumps(update_account(engine, settings, name, disabled=disabled)))
    except AccountError as error:
        _fail(str(error))


@account_command.command("disable")
@click.argument("name")
def disable(name: str) -> None:
    """Stop account NAME: nothing is enqueued or sent for it; its waiting payments wait."""
    _enabled(name, True)


@account_command.command("enable")
@click.argument("name")
def enable(name: str) -> None:
    """Enable account NAME again."""
    _enabled(name, False)


@account_command.command("rotate-key")
def rotate_key_command() -> None:
    """Re-encrypt every stored token under ACCOUNT_TOKEN_KEY's first key (then the old key can be dropped)."""
    from worker.accounts import rotate_key
    from worker.secrets_box import TokenKeyError

    engine, settings = _context()
    try:
        rotated = rotate_key(engine, settings)
    except TokenKeyError as error:
        _fail(str(error))
        return
    click.echo(json.dumps({"rotated": rotated}))


@account_command.command("new-key")
def new_key() -> None:
    """Print a fresh key for ACCOUNT_TOKEN_KEY (put it first in the list to rotate)."""
    from worker.secrets_box import generate_key

    click.echo(generate_key())
