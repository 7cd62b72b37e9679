"""The `ledger` command: help everywhere, settings as flags and environment."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ledger.cli import COMMANDS, build_parser, settings_from_args


def ledger(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ledger", *args], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("command", [[], *([name] for name in COMMANDS), ["token", "create"], ["token", "revoke"]])
def test_every_command_has_help(command):
    result = ledger(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: ledger" in result.stdout
    if command:
        assert "--database-url" in result.stdout or command == ["token"]


def test_flags_override_environment(monkeypatch):
    monkeypatch.setenv("LEDGER_DATABASE_URL", "postgresql://env/db")
    monkeypatch.setenv("LEDGER_CAPTURE_BATCH_SIZE", "77")
    args = build_parser().parse_args(["capture", "--database-url", "postgresql://flag/db", "--no-auth"])
    settings = settings_from_args(args)
    assert settings.database_url == "postgresql://flag/db"
    assert settings.capture_batch_size == 77
    assert settings.auth is False


def test_invalid_setting_is_a_clear_error():
    result = ledger("migrate", "--capture-batch-size", "lots")
    assert result.returncode != 0
    assert "capture_batch_size" in result.stderr


async def test_migrate_command_twice(database_url):
    first = ledger("migrate", "--database-url", database_url)
    assert first.returncode == 0, first.stderr
    assert "up to date" in first.stdout  # the fixture already migrated
