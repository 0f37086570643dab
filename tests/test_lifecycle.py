"""Start, reload and stop: the schema check, SIGHUP reload, and SIGTERM drain."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from gateway.app import Gateway, StartupError
from quarantine.db import Store
from tests.conftest import gateway_config, running


async def test_serve_refuses_a_database_that_is_not_ours(tmp_path: Path, sqlite_url: str) -> None:
    store = Store(sqlite_url)
    async with store.transaction() as session:
        await session.execute(text("CREATE TABLE something_else (id INTEGER)"))
    await store.close()
    gateway = Gateway(gateway_config(tmp_path, sqlite_url, None))
    with pytest.raises(StartupError, match="no Sekisho schema version"):
        await gateway.start()
    await gateway.store.close()


async def test_reload_with_errors_keeps_the_running_rules(tmp_path: Path, sqlite_url: str) -> None:
    config_file = tmp_path / "gateway.toml"
    good = '[[rules]]\nname = "hold-all"\nwhen.has_attachments = false\naction = "hold"\n'
    config_file.write_text(good)
    config = gateway_config(
        tmp_path,
        sqlite_url,
        None,
        rules=[{"name": "hold-all", "when": {"has_attachments": False}, "action": "hold"}],
    )
    async with running(config) as gw:
        before = gw.policy.current()
        config_file.write_text(good.replace("has_attachments", "has_attachmnets"))
        assert gw.reload(config_file) is False
        assert gw.policy.current() is before
        config_file.write_text(good.replace('"hold"', '"delay"\ndelay = "1m"'))
        assert gw.reload(config_file) is True
        assert gw.policy.current() is not before
    log = Path(config.audit.path).read_text().splitlines()
    events = [json.loads(line)["event"] for line in log]
    assert events.count("config.reload_failed") == 1 and events.count("config.reloaded") == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sigterm_drains_and_exits_cleanly(tmp_path: Path) -> None:
    smtp, http = _free_port(), _free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[smtp]\nlisten = "127.0.0.1:{smtp}"\ntrusted_networks = ["127.0.0.1/32"]\n'
        f'[admin]\nlisten = "127.0.0.1:{http}"\n[store]\nurl = "sqlite:///{tmp_path}/s.db"\n'
        f'[audit]\npath = "{tmp_path}/audit.log"\n[delivery]\nupstream = "maildir:{tmp_path}/out"\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", smtp), timeout=1) as conn:
                    if conn.recv(100).startswith(b"220"):
                        break
            except OSError:
                time.sleep(0.1)
        # a session that is open when SIGTERM arrives may still finish its message
        import smtplib

        client = smtplib.SMTP("127.0.0.1", smtp, timeout=10)
        client.ehlo("t")
        client.mail("alice@example.com")
        client.rcpt("bob@client.example")
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        code, reply = client.data(b"Subject: during shutdown\r\n\r\nhi\r\n")
        client.quit()
        output, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert code == 250 and b"queued as" in reply
    assert proc.returncode == 0, output
    log = (tmp_path / "audit.log").read_text().splitlines()
    events = [json.loads(line)["event"] for line in log]
    assert events[-1] == "gateway.stopped"
    assert "message.accepted" in events


async def test_migrations_match_the_models(tmp_path: Path, store_url: str) -> None:
    """What `sekisho migrate` builds is what the models describe (no drift)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from quarantine.migrate import upgrade
    from quarantine.models import Base

    store = Store(store_url)
    await upgrade(store)

    def diff(connection: object) -> list[object]:
        context = MigrationContext.configure(connection, opts={"compare_type": False})  # type: ignore[arg-type]
        return list(compare_metadata(context, Base.metadata))

    async with store.engine.connect() as connection:
        changes = await connection.run_sync(diff)
    await store.close()
    assert changes == []
