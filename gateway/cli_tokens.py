"""`sekisho tokens`: API tokens, shown once, stored only as SHA-256 hashes."""

from __future__ import annotations

import argparse
import hashlib
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from policies.units import parse_duration

TOKEN_PREFIX = "skt_"


def hash_token(token: str) -> str:
    # Tokens are 256 random bits, so a fast hash is enough: there is nothing to guess.
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> tuple[str, str]:
    """The token to show once, and the short prefix that names it in listings."""
    body = secrets.token_urlsafe(32)
    return TOKEN_PREFIX + body, TOKEN_PREFIX + body[:8]


def add_token_commands(sub: Any, config_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    tokens = sub.add_parser(
        "tokens", help="Manage API tokens.", description="Manage API bearer tokens."
    )
    tsub = tokens.add_subparsers(title="token commands", metavar="COMMAND")
    create = tsub.add_parser(
        "create",
        help="Create a token for USER and print it once.",
        description="Create a token for USER. It is printed once and stored only as a hash.",
    )
    config_arg(create)
    create.add_argument("user")
    create.add_argument(
        "--expires", default="90d", help="lifetime, e.g. 30d (default 90d); 'never' for no expiry"
    )
    create.add_argument("--label", help="what the token is for")
    create.set_defaults(run=_create)
    lst = tsub.add_parser(
        "list",
        help="List tokens (prefix, user, expiry).",
        description="List tokens by prefix; the tokens themselves are not stored.",
    )
    config_arg(lst)
    lst.add_argument("--user")
    lst.set_defaults(run=_list)
    revoke = tsub.add_parser(
        "revoke",
        help="Revoke a token by its prefix.",
        description="Revoke a token by the prefix shown in `tokens list`.",
    )
    config_arg(revoke)
    revoke.add_argument("prefix")
    revoke.set_defaults(run=_revoke)


def _create(args: argparse.Namespace) -> int:
    from gateway.cli import _account_call
    from gateway.config import load_config
    from quarantine import accounts

    config = load_config(args.config)
    now = datetime.now(UTC)
    try:
        expires = None if args.expires == "never" else now + parse_duration(args.expires)
    except ValueError as error:
        raise SystemExit(f"--expires: {error}") from None
    token, prefix = new_token()
    _account_call(
        config,
        lambda s: accounts.add_token(
            s,
            user=args.user,
            token_hash=hash_token(token),
            prefix=prefix,
            label=args.label,
            expires_at=expires,
            now=now,
        ),
    )
    print(token)
    return 0


def _list(args: argparse.Namespace) -> int:
    from gateway.cli import _account_call
    from gateway.config import load_config
    from quarantine import accounts

    config = load_config(args.config)
    rows = _account_call(config, lambda s: accounts.tokens_of(s, args.user))
    for token, user in rows:
        state = (
            "revoked"
            if token.revoked_at
            else (f"expires {token.expires_at:%Y-%m-%d}" if token.expires_at else "no expiry")
        )
        print(f"{token.prefix:<14} {user:<20} {state:<20} {token.label or ''}")
    if not rows:
        print("no tokens")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from gateway.cli import _account_call
    from gateway.config import load_config
    from quarantine import accounts

    config = load_config(args.config)
    _account_call(config, lambda s: accounts.revoke_token(s, args.prefix, datetime.now(UTC)))
    print(f"revoked {args.prefix}")
    return 0
