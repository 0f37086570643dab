"""`sekisho`: run the gateway and manage it. Every command has --help."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import glob
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from gateway.config import Config, ConfigError, load_config

T = TypeVar("T")
DEFAULT_CONFIG = "gateway.toml"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except ConfigError as error:
        print(f"config error in {args.config}:", file=sys.stderr)
        for problem in error.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sekisho",
        description="Sekisho: an outbound SMTP gateway that inspects, encrypts, holds or "
        "refuses mail before it leaves the company.",
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    def command(
        name: str, help: str, run: Callable[[argparse.Namespace], int]
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument(
            "--config",
            "-c",
            default=DEFAULT_CONFIG,
            metavar="PATH",
            help=f"config file (default: {DEFAULT_CONFIG})",
        )
        p.set_defaults(run=run)
        return p

    _serve_options(
        command("serve", "Run SMTP intake, delivery and the HTTP API in one process.", _serve)
    )
    command(
        "check-config",
        "Validate the config; print 'ok' or each problem with its key.",
        _check_config,
    )
    command("migrate", "Upgrade the database schema to this release.", _migrate)
    purge = command(
        "purge",
        "Purge message bodies of finished mail older than "
        "[store].keep_bodies (metadata and audit are kept).",
        _purge,
    )
    purge.add_argument("--dry-run", action="store_true", help="only say what would go")
    purge.add_argument(
        "--older-than", metavar="DURATION", help="override [store].keep_bodies, e.g. 30d"
    )
    _policy_commands(sub, command)
    _user_commands(sub)
    _audit_commands(sub)
    _tls_commands(sub)
    from gateway.cli_tokens import add_token_commands

    add_token_commands(sub, _config_arg)
    return parser


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        "-c",
        default=DEFAULT_CONFIG,
        metavar="PATH",
        help=f"config file (default: {DEFAULT_CONFIG})",
    )


def run_async(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


# -- serve, check-config, migrate ------------------------------------------------


def _serve_options(serve: argparse.ArgumentParser) -> None:
    serve.description = (
        "Run SMTP intake, delivery and the HTTP API. With --workers N, a supervisor "
        "runs N such gateway processes on the same SMTP and "
        "HTTP ports (SO_REUSEPORT: the kernel spreads connections over them), each with "
        "its own audit chain '<instance>-wI'. SIGTERM/SIGINT drain and stop them all, "
        "SIGHUP reloads the rules in each, and a worker that dies is restarted."
    )
    serve.add_argument(
        "--workers",
        type=_positive,
        default=1,
        metavar="N",
        help="gateway processes to run, to use N cores (default: 1, one process and no "
        "supervisor); on SQLite their writes take turns on the database file, on "
        "PostgreSQL they run side by side",
    )
    # How the supervisor starts one of its workers; not for people.
    for hidden in ("--worker", "--smtp-port", "--http-port", "--supervisor-fd"):
        serve.add_argument(hidden, type=int, help=argparse.SUPPRESS)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of processes >= 1, not {text!r}")
    return value


def _serve(args: argparse.Namespace) -> int:
    from gateway.app import StartupError, serve
    from gateway.supervisor import refuse_store, run_worker, supervise, worker_config

    config_path = Path(args.config)
    tag = f" w{args.worker}" if args.worker else ""
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s %(levelname)s{tag} %(name)s: %(message)s"
    )
    for noisy in ("mail.log", "aiosmtpd"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.worker:
            config = worker_config(
                load_config(config_path), args.worker, args.smtp_port, args.http_port
            )
            _install_uvloop()
            asyncio.run(
                run_worker(config_path, config, args.worker, args.workers, args.supervisor_fd)
            )
        elif args.workers > 1:
            config = load_config(config_path)
            refused = refuse_store(config, args.workers)
            if refused:
                print(f"sekisho: cannot start: {refused}", file=sys.stderr)
                return 1
            return supervise(config_path, config, args.workers)
        else:
            _install_uvloop()
            asyncio.run(serve(config_path))
    except StartupError as error:
        print(f"sekisho: cannot start: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"sekisho: cannot start: {error}", file=sys.stderr)
        return 1
    return 0


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    uvloop.install()


def _check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    from gateway.policy_source import lint_config

    for warning in lint_config(config, _known_groups(config)):
        print(f"warning: {warning}", file=sys.stderr)
    print("ok")
    return 0


def _known_groups(config: Config) -> set[str] | None:
    """Users' groups from the store, if it exists and is current; None otherwise."""
    from quarantine import accounts
    from quarantine.db import Store
    from quarantine.migrate import SchemaStatus, schema_status

    async def go() -> set[str] | None:
        store = Store(config.store.url)
        try:
            if await schema_status(store) is not SchemaStatus.CURRENT:
                return None
            async with store.read() as session:
                return {g for u in await accounts.all_users(session) for g in u.groups}
        except Exception:
            return None
        finally:
            await store.close()

    return run_async(go())


def _purge(args: argparse.Namespace) -> int:
    from gateway.retention import purge
    from policies.units import parse_duration
    from quarantine.db import Store

    config = load_config(args.config)
    try:
        keep = parse_duration(args.older_than) if args.older_than else config.store.keep_bodies
    except ValueError as error:
        raise SystemExit(f"--older-than: {error}") from None
    if keep is None:
        raise SystemExit("no retention set: give --older-than or set [store].keep_bodies")

    async def go() -> int:
        store = Store(config.store.url)
        try:
            report = await purge(store, datetime.now(UTC), keep, dry_run=args.dry_run)
        finally:
            await store.close()
        verb = "would purge" if args.dry_run else "purged"
        print(
            f"{verb} {report.bodies} message bodies ({report.bytes} bytes) and "
            f"{report.keys} ZIP passwords of mail finished more than {keep} ago"
        )
        return 0

    return run_async(go())


def _migrate(args: argparse.Namespace) -> int:
    from quarantine.db import Store
    from quarantine.migrate import SchemaStatus, head_revision, schema_status, upgrade

    config = load_config(args.config)

    async def go() -> int:
        store = Store(config.store.url)
        try:
            status = await schema_status(store)
            if status is SchemaStatus.CURRENT:
                print(f"schema is current ({head_revision()})")
                return 0
            if status in (SchemaStatus.NEWER, SchemaStatus.FOREIGN):
                print(f"refusing to migrate: schema is {status.value}", file=sys.stderr)
                return 1
            await upgrade(store)
            print(f"migrated to {head_revision()}")
            return 0
        finally:
            await store.close()

    return run_async(go())


# -- policy test -----------------------------------------------------------------


def _policy_commands(sub: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    policy = sub.add_parser(
        "policy", help="Try the rules on a message.", description="Try the rules on a message."
    )
    psub = policy.add_subparsers(title="policy commands", metavar="COMMAND")
    test = psub.add_parser(
        "test",
        help="Print the verdict, each rule's trace and the facts seen for MESSAGE.eml.",
        description="Evaluate MESSAGE.eml with the configured rules, exactly as the live "
        "gateway would, and print the verdict, each rule's trace and the facts.",
    )
    _config_arg(test)
    test.add_argument("message", metavar="MESSAGE.eml", help="the message file ('-' for stdin)")
    test.add_argument(
        "--from", dest="mail_from", required=True, metavar="ADDR", help="envelope sender"
    )
    test.add_argument(
        "--to", dest="rcpt", required=True, nargs="+", metavar="ADDR", help="envelope recipients"
    )
    test.add_argument("--user", metavar="NAME", help="evaluate as this authenticated user")
    test.add_argument(
        "--group",
        action="append",
        default=[],
        metavar="G",
        help="sender group (repeatable), when no --user is given",
    )
    test.add_argument("--json", action="store_true", help="print JSON instead of text")
    test.set_defaults(run=_policy_test)


def _policy_test(args: argparse.Namespace) -> int:
    from gateway.intake import normalize_newlines
    from gateway.policy_source import compile_policy, render_inspection
    from policies.engine import inspect
    from policies.envelope import Envelope

    config = load_config(args.config)
    raw = sys.stdin.buffer.read() if args.message == "-" else _read(args.message)
    if raw is None:
        return 1
    envelope = Envelope(
        mail_from=args.mail_from,
        rcpt_tos=tuple(args.rcpt),
        sender_user=args.user,
        sender_groups=tuple(args.group),
    )
    result = inspect(normalize_newlines(raw), envelope, compile_policy(config), datetime.now(UTC))
    print(render_inspection(result, as_json=args.json))
    return 0


def _read(path: str) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        print(f"cannot read {path}: {error.strerror}", file=sys.stderr)
        return None


# -- users -----------------------------------------------------------------------


def _user_commands(sub: Any) -> None:
    users = sub.add_parser(
        "users",
        help="Manage senders, approvers, admins and auditors.",
        description="Manage people: their addresses, groups and roles.",
    )
    usub = users.add_subparsers(title="user commands", metavar="COMMAND")
    add = usub.add_parser(
        "add",
        help="Add a user; the password is read from stdin or a prompt.",
        description="Add a user. The password is read from a prompt, or "
        "from stdin when it is not a terminal.",
    )
    _config_arg(add)
    add.add_argument("name")
    add.add_argument(
        "--email",
        action="append",
        default=[],
        metavar="ADDR",
        help="an address this user may send as (repeatable)",
    )
    add.add_argument(
        "--group",
        action="append",
        default=[],
        metavar="G",
        help="a group for rules and approver routing (repeatable)",
    )
    add.add_argument("--role", default="sender", choices=["sender", "approver", "admin", "auditor"])
    add.add_argument(
        "--no-password", action="store_true", help="API-only user: no SMTP login, tokens only"
    )
    add.set_defaults(run=_users_add)
    lst = usub.add_parser("list", help="List users.", description="List users.")
    _config_arg(lst)
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(run=_users_list)
    rm = usub.add_parser(
        "remove",
        help="Remove a user and their tokens.",
        description="Remove a user and their tokens.",
    )
    _config_arg(rm)
    rm.add_argument("name")
    rm.set_defaults(run=_users_remove)
    pw = usub.add_parser(
        "passwd",
        help="Set a user's password (stdin or prompt).",
        description="Set a user's password, read from a prompt or stdin.",
    )
    _config_arg(pw)
    pw.add_argument("name")
    pw.set_defaults(run=_users_passwd)


def read_password(prompt: str = "Password: ") -> str:
    if sys.stdin.isatty():
        first = getpass.getpass(prompt)
        if first != getpass.getpass("Again: "):
            raise SystemExit("passwords do not match")
        password = first
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < 8:
        raise SystemExit("password too short: use at least 8 characters")
    return password


def _with_store(config: Config, action: Callable[[Any], Awaitable[T]]) -> T:
    from quarantine.db import Store
    from quarantine.migrate import SchemaStatus, schema_status, upgrade

    async def go() -> T:
        store = Store(config.store.url)
        try:
            if await schema_status(store) is SchemaStatus.EMPTY:
                await upgrade(store)
            async with store.transaction() as session:
                return await action(session)
        finally:
            await store.close()

    return run_async(go())


def _users_add(args: argparse.Namespace) -> int:
    from gateway.credentials import hash_password
    from quarantine import accounts

    config = load_config(args.config)
    if not args.email and args.role == "sender":
        raise SystemExit("a sender needs at least one --email address")
    hashed = None if args.no_password else hash_password(read_password())
    now = datetime.now(UTC)

    async def act(session: Any) -> None:
        await accounts.add_user(
            session,
            name=args.name,
            password_hash=hashed,
            role=accounts.Role(args.role),
            emails=args.email,
            groups=args.group,
            now=now,
        )

    _account_call(config, act)
    print(f"added {args.role} {args.name}")
    return 0


def _account_call(config: Config, act: Callable[[Any], Awaitable[T]]) -> T:
    from quarantine.accounts import AccountError

    try:
        return _with_store(config, act)
    except AccountError as error:
        raise SystemExit(f"sekisho: {error}") from None


def _users_list(args: argparse.Namespace) -> int:
    from quarantine import accounts

    config = load_config(args.config)

    async def act(session: Any) -> list[dict[str, Any]]:
        return [
            {
                "name": u.name,
                "role": u.role,
                "emails": u.emails,
                "groups": u.groups,
                "login": bool(u.password_hash),
                "disabled": u.disabled,
            }
            for u in await accounts.all_users(session)
        ]

    rows = _account_call(config, act)
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return 0
    for row in rows:
        print(
            f"{row['name']:<20} {row['role']:<9} {','.join(row['emails']):<40} "
            f"groups={','.join(row['groups']) or '-'}"
        )
    if not rows:
        print("no users yet: add one with `sekisho users add NAME --email ADDR`")
    return 0


def _users_remove(args: argparse.Namespace) -> int:
    from quarantine import accounts

    config = load_config(args.config)
    _account_call(config, lambda s: accounts.remove_user(s, args.name))
    print(f"removed {args.name}")
    return 0


def _users_passwd(args: argparse.Namespace) -> int:
    from gateway.credentials import hash_password
    from quarantine import accounts

    config = load_config(args.config)
    hashed = hash_password(read_password("New password: "))
    _account_call(config, lambda s: accounts.set_password(s, args.name, hashed, datetime.now(UTC)))
    print(f"password changed for {args.name}")
    return 0


# -- audit, tls -------------------------------------------------------------------


def _audit_commands(sub: Any) -> None:
    audit = sub.add_parser(
        "audit", help="Work with the audit log.", description="Work with the audit log."
    )
    asub = audit.add_subparsers(title="audit commands", metavar="COMMAND")
    verify = asub.add_parser(
        "verify",
        help="Check the audit log's hash chain.",
        description="Check every line's hash and its link to the line "
        "before; report the first broken line.",
    )
    _config_arg(verify)
    verify.add_argument("--path", help="audit log file (default: [audit].path from the config)")
    verify.set_defaults(run=_audit_verify)


def _audit_verify(args: argparse.Namespace) -> int:
    from gateway.audit import verify

    path = args.path or load_config(args.config).audit.path
    if path == "-":
        raise SystemExit("the audit log goes to stdout ([audit].path = '-'); give --path")
    paths = sorted(glob.glob(path.replace("{instance}", "*"))) if "{instance}" in path else [path]
    if not paths:
        print(f"no audit log matches {path}", file=sys.stderr)
        return 1
    failed = 0
    for one in paths:
        try:
            result = verify(one)
        except OSError as error:
            print(f"cannot read {one}: {error.strerror}", file=sys.stderr)
            failed += 1
            continue
        if result.ok:
            print(f"ok: {result.lines} lines, every chain intact ({one})")
        else:
            print(f"{one}: broken at line {result.broken_at}: {result.reason}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def _tls_commands(sub: Any) -> None:
    tls = sub.add_parser("tls", help="TLS helpers.", description="TLS helpers.")
    tsub = tls.add_subparsers(title="tls commands", metavar="COMMAND")
    selfsigned = tsub.add_parser(
        "self-signed",
        help="Write a self-signed certificate and key for trials.",
        description="Write a self-signed certificate and key for trials. Point "
        "[smtp].tls_cert and tls_key at them.",
    )
    selfsigned.add_argument("--hostname", default="localhost")
    selfsigned.add_argument("--out", default="var/tls", help="directory (default: var/tls)")
    selfsigned.add_argument("--days", type=int, default=365)
    selfsigned.set_defaults(run=_tls_self_signed)


def _tls_self_signed(args: argparse.Namespace) -> int:
    from gateway.tls import write_self_signed

    cert, key = write_self_signed(Path(args.out), args.hostname, args.days)
    print(f"wrote {cert} and {key}")
    print(f'set [smtp] tls_cert = "{cert}" and tls_key = "{key}"')
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
