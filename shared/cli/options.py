"""Options shared by walship commands, and how flags become settings.

Flags default to None so that "not given" is distinguishable from "given":
a flag that is None does not override the environment, the config file or the
default (precedence: flag > env > file > default). The environment is read by
the settings, not by click, so ``walship config show`` can tell where each value
came from.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from walship.shared.settings import WalshipSettings, env_var_name, load_settings_from

F = TypeVar("F", bound=Callable[..., Any])

# Python parameter name -> (dotted setting, flag as the user types it).
FLAG_SETTINGS: dict[str, tuple[str, str]] = {
    "bootstrap_servers": ("kafka.bootstrap_servers", "--bootstrap-servers"),
    "topic": ("topic.name", "--topic"),
    "partitions": ("topic.partitions", "--partitions"),
    "replication_factor": ("topic.replication_factor", "--replication-factor"),
    "snapshot_url": ("snapshot_url", "--snapshot-url"),
    "data_dir": ("data_dir", "--data-dir"),
    "reader_id": ("consumer.reader_id", "--reader-id"),
}


def _env_help(param: str, text: str) -> str:
    return f"{text} [env: {env_var_name(FLAG_SETTINGS[param][0])}]"


def kafka_options(f: F) -> F:
    """Add --bootstrap-servers, --topic, --partitions and --config."""
    decorators = [
        click.option(
            "--bootstrap-servers",
            default=None,
            metavar="HOST:PORT[,...]",
            help=_env_help("bootstrap_servers", "Kafka brokers."),
        ),
        click.option("--topic", default=None, help=_env_help("topic", "Topic of the stream.")),
        click.option(
            "--partitions",
            type=int,
            default=None,
            help=_env_help("partitions", "Partition count of the topic."),
        ),
        config_option,
    ]
    for decorate in reversed(decorators):
        f = decorate(f)
    return f


config_option = click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="TOML settings file [env: WALSHIP_CONFIG].",
)


def snapshot_options(f: F) -> F:
    """Add --snapshot-url."""
    return click.option(
        "--snapshot-url",
        default=None,
        metavar="URL",
        help=_env_help("snapshot_url", "Snapshot store: file:///dir or kafka://topic."),
    )(f)


def data_dir_option(f: F) -> F:
    """Add --data-dir."""
    return click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help=_env_help("data_dir", "Data directory (WAL, state.db)."),
    )(f)


def json_option(f: F) -> F:
    """Add --json (passed to the command as ``as_json``)."""
    return click.option(
        "--json", "as_json", is_flag=True, default=False, help="Print JSON instead of text."
    )(f)


def split_flags(flag_values: dict[str, Any]) -> tuple[Path | None, dict[str, Any], dict[str, str]]:
    config = flag_values.pop("config", None)
    overrides: dict[str, Any] = {}
    flag_names: dict[str, str] = {}
    for name, value in flag_values.items():
        if name in FLAG_SETTINGS:
            dotted, flag = FLAG_SETTINGS[name]
            flag_names[dotted] = flag
        elif "__" in name:
            dotted = name.replace("__", ".")
        else:
            raise TypeError(
                f"settings_from() got {name!r}, which is not a known flag "
                f"({', '.join(sorted(FLAG_SETTINGS))}, config) nor a nested name like "
                "'consumer__http_port'"
            )
        if value is not None:
            overrides[dotted] = value
    return (Path(config) if config is not None else None), overrides, flag_names


def settings_from(**flag_values: Any) -> WalshipSettings:
    """Settings with flag > env > file > default; flags that are None do not override.

    Accepts the parameters the decorators above add (``bootstrap_servers``,
    ``topic``, ``partitions``, ``config``, ``snapshot_url``, ``data_dir``, plus
    ``replication_factor`` and ``reader_id``) and nested names such as
    ``consumer__http_port=8081``. Raises ConfigError (exit code 2).
    """
    config, overrides, flag_names = split_flags(dict(flag_values))
    return load_settings_from(config, overrides, flag_names)
