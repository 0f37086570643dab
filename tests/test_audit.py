"""The audit log's hash chain: one chain per instance, tampering found, a torn tail
from a power cut trimmed, secrets refused."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

from gateway.audit import AuditLog, verify


def _events(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_instances_share_one_file_and_each_chain_verifies(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    a, b = AuditLog(str(path), instance="gw-a"), AuditLog(str(path), instance="gw-b")
    for n in range(5):
        a.emit("delivery.sent", id=f"a{n}")
        b.emit("delivery.sent", id=f"b{n}")
    a.close()
    b.close()
    # a restarted instance continues its own chain, not the other's
    AuditLog(str(path), instance="gw-a").emit("gateway.started")
    assert verify(str(path)).ok
    lines = _events(path)
    assert {e["instance"] for e in lines} == {"gw-a", "gw-b"}
    a_lines = [e for e in lines if e["instance"] == "gw-a"]
    assert all(later["prev"] == earlier["hash"] for earlier, later in itertools.pairwise(a_lines))


def test_removing_a_line_of_one_instance_is_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    a, b = AuditLog(str(path), instance="gw-a"), AuditLog(str(path), instance="gw-b")
    for n in range(3):
        a.emit("x", id=f"a{n}")
        b.emit("x", id=f"b{n}")
    a.close()
    b.close()
    lines = path.read_text().splitlines()
    del lines[2]  # a1
    path.write_text("\n".join(lines) + "\n")
    result = verify(str(path))
    assert not result.ok and result.broken_at == 4  # a2, whose prev was the removed a1
    assert "instance gw-a" in result.reason


def test_torn_last_line_is_trimmed_on_start(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(str(path), instance="gw")
    log.emit("one")
    log.close()
    with open(path, "a") as handle:
        handle.write('{"ts":"2026-11-23T00:00:00Z","event":"half')  # a power cut mid-line
    log = AuditLog(str(path), instance="gw")
    log.emit("two")
    log.close()
    assert [e["event"] for e in _events(path)] == ["one", "two"]
    assert verify(str(path)).ok


def test_secret_keys_are_redacted_and_observers_see_every_event(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(str(path))
    seen: list[str] = []
    log.subscribe(lambda event: seen.append(str(event["event"])))
    log.emit("auth.failed", password="hunter2", token="skt_abc", login="alice")
    log.close()
    text = path.read_text()
    assert "hunter2" not in text and "skt_abc" not in text
    assert seen == ["auth.failed"]
    assert verify(str(path)).ok


def test_verify_command_checks_every_instance_file(tmp_path: Path) -> None:
    pattern = str(tmp_path / "audit-{instance}.log")
    for name in ("gw-a", "gw-b"):
        log = AuditLog(pattern, instance=name)
        log.emit("gateway.started")
        log.close()
    config = tmp_path / "gateway.toml"
    config.write_text(f'[audit]\npath = "{pattern}"\n')
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "audit", "verify", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("every chain intact") == 2
    broken = tmp_path / "audit-gw-b.log"
    broken.write_text(broken.read_text().replace("gateway.started", "gateway.stopped"))
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "audit", "verify", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "audit-gw-b.log: broken at line 1" in result.stderr
