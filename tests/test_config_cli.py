"""A config typo never starts: check-config and serve name the key and exit 1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SHIPPED = Path(__file__).resolve().parent.parent / "gateway.toml"


def sekisho(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
    )


def test_shipped_config_is_valid() -> None:
    result = sekisho("check-config", "--config", str(SHIPPED))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize(
    "edit, expected",
    [
        (
            ('upstream = "maildir:var/outbox"', 'upstream = "smpt://mail.example:25"'),
            "delivery.upstream: unknown scheme 'smpt'",
        ),
        (
            ('max_message_size = "50MiB"', 'max_message_size = "fifty"'),
            "smtp.max_message_size: not a size",
        ),
        (
            ('listen = "127.0.0.1:10025"', 'lisen = "127.0.0.1:10025"'),
            "smtp.lisen: unknown key (did you mean 'listen'?)",
        ),
        (('auth = "optional"', 'auth = "sometimes"'), "smtp.auth:"),
        (
            ('bounce_after = "5d"', 'bounce_after = "5 days"'),
            "delivery.bounce_after: not a duration",
        ),
        (("[organization]", "[organization]\nbogus = 1"), "organization.bogus: unknown key"),
    ],
)
def test_broken_config_names_the_key_and_exits_1(
    tmp_path: Path, edit: tuple[str, str], expected: str
) -> None:
    text = SHIPPED.read_text(encoding="utf-8")
    assert edit[0] in text
    config = tmp_path / "gateway.toml"
    config.write_text(text.replace(edit[0], edit[1], 1), encoding="utf-8")
    result = sekisho("check-config", "--config", str(config))
    assert result.returncode == 1
    assert expected in result.stderr
    served = sekisho("serve", "--config", str(config))
    assert served.returncode == 1
    assert expected in served.stderr


def test_unknown_rule_condition_gets_a_did_you_mean(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[[rules]]\nname = "pii"\nwhen.pii_mn = 1\naction = "hold"\n')
    result = sekisho("check-config", "--config", str(config))
    assert result.returncode == 1
    assert "rules[0].when: unknown condition 'pii_mn' (did you mean 'pii_min'?)" in result.stderr


def test_invalid_toml_and_missing_file_are_reported(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("[smtp\nlisten = 1\n")
    result = sekisho("check-config", "--config", str(config))
    assert result.returncode == 1 and "not valid TOML" in result.stderr
    result = sekisho("check-config", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 1 and "no such file" in result.stderr


def test_secret_from_missing_environment_variable_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[delivery]\nusername = "gw"\npassword = "env:SEKISHO_TEST_UNSET_VAR"\n')
    result = sekisho("check-config", "--config", str(config))
    assert result.returncode == 1
    assert (
        "delivery.password: environment variable SEKISHO_TEST_UNSET_VAR is not set" in result.stderr
    )


def test_every_command_has_help() -> None:
    for command in (
        ["serve"],
        ["check-config"],
        ["migrate"],
        ["policy", "test"],
        ["users", "add"],
        ["users", "list"],
        ["users", "remove"],
        ["users", "passwd"],
        ["tokens", "create"],
        ["tokens", "list"],
        ["tokens", "revoke"],
        ["audit", "verify"],
        ["tls", "self-signed"],
    ):
        result = sekisho(*command, "--help")
        assert result.returncode == 0, command
        assert "usage: sekisho" in result.stdout


def test_users_add_and_list_through_the_cli(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(f'[store]\nurl = "sqlite:///{tmp_path}/s.db"\n')
    added = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "users",
            "add",
            "alice",
            "--config",
            str(config),
            "--email",
            "alice@example.com",
            "--group",
            "sales",
        ],
        input="correct horse battery\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert added.returncode == 0, added.stderr
    listed = sekisho("users", "list", "--config", str(config))
    assert "alice" in listed.stdout and "alice@example.com" in listed.stdout
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "users",
            "add",
            "alice",
            "--config",
            str(config),
            "--email",
            "a2@example.com",
        ],
        input="correct horse battery\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode != 0 and "already exists" in again.stderr
    token = sekisho("tokens", "create", "alice", "--config", str(config))
    assert token.returncode == 0 and token.stdout.startswith("skt_")
    tokens = sekisho("tokens", "list", "--config", str(config))
    assert "alice" in tokens.stdout and token.stdout.strip() not in tokens.stdout


def test_shipped_examples_are_valid_when_uncommented(tmp_path: Path) -> None:
    text = SHIPPED.read_text(encoding="utf-8")
    head, _, examples = text.partition("## Client companies and rules.")
    assert examples, "the shipped config has lost its rule examples"
    # "## " lines are prose; "# " lines are the examples
    uncommented = "\n".join(
        line[2:] if line.startswith("# ") else line
        for line in examples.splitlines()[1:]
        if not line.startswith("##")
    )
    config = tmp_path / "gateway.toml"
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "globex.zip.txt").write_text("globex-secret\n")
    config.write_text(head + uncommented, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
        env={**__import__("os").environ, "SEKISHO_ACME_ZIP": "acme-secret"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    actions = {"refuse", "hold", "delay", "deliver"}
    assert all(f'action = "{a}"' in uncommented for a in actions)
    from policies.config import When
    for condition in When.model_fields:
        assert f"when.{condition}" in uncommented, condition


def test_deployment_example_config_is_valid() -> None:
    example = SHIPPED.parent / "deploy" / "gateway.toml"
    result = sekisho("check-config", "--config", str(example))
    assert result.returncode == 0, result.stderr
