"""The `ledger` command. Every setting is also a flag (``--database-url`` for
``LEDGER_DATABASE_URL``); flags win over the environment."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sys
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from ledger import __version__
from ledger.config import Settings

# command -> (help, "module:function"); each function takes (settings, args).
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("Run every ledger process in one, on embedded defaults where unset.", "ledger.up:run"),
    "serve": ("Serve the HTTP API and websocket stream (Starlette on uvicorn).", "ledger.api.server:run"),
    "capture": ("Consume Celery events from the broker into the log.", "ledger.capture.service:run"),
    "projector": ("Fold the log into the task, group and worker views.", "ledger.projections.projector:run"),
    "migrate": ("Apply sql/NNN_*.sql migrations (safe to run twice, and concurrently).", "ledger.cli:run_migrate"),
    "rebuild": ("Drop every projection and replay it from the log.", "ledger.projections.rebuild:run"),
    "token": ("Create, list and revoke API tokens.", "ledger.api.tokens:run"),
}


def _settings_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (each also LEDGER_<NAME> in the environment)")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description or ''} [env LEDGER_{name.upper()}]"
        if field.annotation is bool:
            group.add_argument(flag, dest=f"setting_{name}", action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(flag, dest=f"setting_{name}", default=None, metavar=name.upper(), help=help_text)


def _add_command_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    if name == "token":
        sub = parser.add_subparsers(dest="token_command", required=True, metavar="{create,list,revoke}")
        create = sub.add_parser("create", help="Create a token; prints it alone on the last line.")
        create.add_argument("--scope", action="append", choices=["read", "control", "admin"], default=None,
                            help="Scope to grant (repeatable; default read).")
        create.add_argument("--label", default="", help="A note on who or what the token is for.")
        _settings_flags(create)
        sub.add_parser("list", help="List tokens (never their secret).").set_defaults()
        _settings_flags(sub.choices["list"])
        revoke = sub.add_parser("revoke", help="Revoke a token by id or prefix.")
        revoke.add_argument("token_id", help="The token's id as `ledger token list` shows it.")
        _settings_flags(revoke)
        return
    if name == "rebuild":
        parser.add_argument("--no-progress", action="store_true", help="Do not draw the progress bar.")
    _settings_flags(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ledger",
        description="Celery Ledger: every Celery event in an append-only PostgreSQL log, "
        "projected into task, group and worker views, served over HTTP and websockets.",
    )
    parser.add_argument("--version", action="version", version=f"celery-ledger {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, _) in COMMANDS.items():
        _add_command_arguments(name, sub.add_parser(name, help=help_text, description=help_text))
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {
        key.removeprefix("setting_"): value
        for key, value in vars(args).items()
        if key.startswith("setting_") and value is not None
    }
    return Settings(**overrides)


def resolve(target: str) -> Callable[[Settings, argparse.Namespace], Any]:
    module_name, _, func = target.partition(":")
    return getattr(importlib.import_module(module_name), func)


def run_migrate(settings: Settings, args: argparse.Namespace) -> None:
    from ledger.migrate import migrate

    applied = asyncio.run(migrate(settings.require_database()))
    print("applied: " + ", ".join(applied) if applied else "database is up to date")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        sys.exit(f"invalid setting: {exc}")
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    result = resolve(COMMANDS[args.command][1])(settings, args)
    if isinstance(result, int):
        sys.exit(result)
