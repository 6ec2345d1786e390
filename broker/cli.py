"""The one CLI: ``broker <command>`` (also ``python -m broker``).

Commands load settings once, print tables for people and ``--json`` for
scripts, and turn every ``BrokerError`` into one line ``error CODE: message``
with a non-zero exit (2 for configuration, 1 otherwise). No traceback, no
secret, ever reaches the terminal.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import click

from broker import __version__
from broker.errors import BrokerError, ConfigError
from broker.settings import Settings, load_settings

P = ParamSpec("P")
R = TypeVar("R")


def fail(message: str, code: int = 1) -> None:
    """Print one error line to stderr and exit."""
    click.echo(message, err=True)
    sys.exit(code)


def handle_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn ``BrokerError`` into a one-line message and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            fail(f"error {exc.code}: {exc.message}", 2)
        except BrokerError as exc:
            fail(f"error {exc.code}: {exc.message}", 1)
        raise AssertionError("unreachable")  # pragma: no cover

    return wrapper


def settings_from(ctx: click.Context) -> Settings:
    """Load settings once per invocation (errors become exit 2)."""
    obj: dict[str, Any] = ctx.ensure_object(dict)
    if "settings" not in obj:
        try:
            obj["settings"] = load_settings()
        except ConfigError as exc:
            fail(f"error {exc.code}: {exc.message}", 2)
    settings: Settings = obj["settings"]
    return settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mspc-broker")
def cli() -> None:
    """mspc-broker: short-lived MSPC_TOKENs for Kubernetes workloads."""


@cli.command("config")
@click.pass_context
@handle_errors
def config_cmd(ctx: click.Context) -> None:
    """Validate the configuration from the environment and print it (secrets masked)."""
    settings = settings_from(ctx)
    click.echo(settings.model_dump_json(indent=2))


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="broker")
