"""``walship config show``: the effective settings and where each came from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from walship.shared.cli.options import (
    data_dir_option,
    json_option,
    kafka_options,
    snapshot_options,
    split_flags,
)
from walship.shared.settings import (
    effective_settings,
    iter_fields,
    load_settings_from,
    setting_sources,
)


@click.group("config")
def config_group() -> None:
    """Inspect walship's settings."""


def _value_at(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        node = node[part]
    return node


@config_group.command("show")
@kafka_options
@snapshot_options
@data_dir_option
@json_option
def show_cmd(
    bootstrap_servers: str | None,
    topic: str | None,
    partitions: int | None,
    config: Path | None,
    snapshot_url: str | None,
    data_dir: Path | None,
    as_json: bool,
) -> None:
    """Print the effective settings (secrets masked) and the source of each.

    Invalid settings exit with code 2, one line per problem.
    """
    config_file, overrides, flag_names = split_flags(
        {
            "bootstrap_servers": bootstrap_servers,
            "topic": topic,
            "partitions": partitions,
            "config": config,
            "snapshot_url": snapshot_url,
            "data_dir": data_dir,
        }
    )
    settings = load_settings_from(config_file, overrides, flag_names)
    data = effective_settings(settings)
    sources = setting_sources(config_file, overrides, flag_names)
    if as_json:
        click.echo(json.dumps({"settings": data, "sources": sources}, indent=2))
        return
    rows = [(dotted, json.dumps(_value_at(data, dotted))) for dotted, _ in iter_fields()]
    name_width = max(len(name) for name, _ in rows)
    value_width = max(len(value) for _, value in rows)
    for name, value in rows:
        click.echo(f"{name:<{name_width}} = {value:<{value_width}}  # {sources[name]}")
