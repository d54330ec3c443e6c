"""The ``walship`` command.

Each area defines its commands in its own module; they are imported only when
used (or listed by ``--help``), so ``walship verify`` does not pay for aiokafka.
A module (or its command attribute) that does not exist is skipped: that area
is not installed or not written yet. A module that exists but fails to import
raises, because hiding that would hide a bug.

Exit codes: 0 ok, 1 a WalshipError (its message on stderr, no traceback),
2 a usage error or a ConfigError.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import Any

import click
from walship.shared.errors import ConfigError, WalshipError

# command name -> (module, attribute). Ours are required; the others optional.
_REQUIRED: dict[str, tuple[str, str]] = {
    "config": ("walship.shared.cli.config_cmd", "config_group"),
    "devcluster": ("walship.shared.cli.devcluster_cmd", "devcluster_cmd"),
    "verify": ("walship.shared.cli.verify_cmd", "verify_cmd"),
}
_OPTIONAL: dict[str, tuple[str, str]] = {
    "producer": ("walship.producer.cli", "producer_group"),
    "writer": ("walship.producer.cli", "writer_group"),
    "topic": ("walship.producer.cli", "topic_group"),
    "consumer": ("walship.consumer.cli", "consumer_group"),
    "status": ("walship.consumer.cli", "status_cmd"),
    "snapshot": ("walship.shared.cli.snapshot_cmd", "snapshot_group"),
    "digest": ("walship.shared.cli.digest_cmd", "digest_cmd"),
    "demo": ("walship.shared.cli.demo", "demo_cmd"),
    "bench": ("walship.shared.cli.bench", "bench_cmd"),
    "chaos": ("walship.shared.cli.chaos", "chaos_cmd"),
}

EXIT_FAILURE = 1
EXIT_USAGE = 2


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def _load_optional(name: str) -> click.Command | None:
    """An optional command: None if its module or attribute does not exist (yet)."""
    module_name, attr = _OPTIONAL[name]
    if not _module_exists(module_name):
        return None
    # Import errors inside an existing module propagate: they are bugs.
    command = getattr(importlib.import_module(module_name), attr, None)
    if command is None:
        return None
    if not isinstance(command, click.Command):
        raise RuntimeError(f"{module_name}.{attr} is not a click command (walship {name})")
    return command


class WalshipGroup(click.Group):
    """Lazily loaded subcommands, and walship errors turned into exit codes."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = set(super().list_commands(ctx)) | set(_REQUIRED)
        names |= {name for name in _OPTIONAL if _load_optional(name) is not None}
        return sorted(names)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            return command
        if cmd_name in _OPTIONAL:
            return _load_optional(cmd_name)
        if cmd_name not in _REQUIRED:
            return None
        module_name, attr = _REQUIRED[cmd_name]
        command = getattr(importlib.import_module(module_name), attr)
        if not isinstance(command, click.Command):
            raise RuntimeError(f"{module_name}.{attr} is not a click command (walship {cmd_name})")
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(EXIT_USAGE)
        except WalshipError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(EXIT_FAILURE)


@click.group(cls=WalshipGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="walship", prog_name="walship")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
    envvar="WALSHIP_LOG_LEVEL",
    help="Log level (logs go to stderr) [env: WALSHIP_LOG_LEVEL].",
)
def main(log_level: str) -> None:
    """walship: replicate a write-ahead log through Kafka to read replicas."""
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if log_level != "debug":
        # aiokafka narrates routine client events at INFO (subscriptions, coordinator
        # discovery); its warnings and errors still show.
        logging.getLogger("aiokafka").setLevel(max(logging.WARNING, logging.getLogger().level))


if __name__ == "__main__":
    main()
