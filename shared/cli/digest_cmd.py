"""``walship digest``: the content digest of a store (writer state.db or a replica)."""

from __future__ import annotations

import json
from pathlib import Path

import click
from walship.shared.errors import ConfigError
from walship.shared.store import digest_file


@click.command("digest")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Writer data directory: digests <data-dir>/state.db.",
)
@click.option(
    "--db",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="A store file (a replica), instead of --data-dir.",
)
def digest_cmd(data_dir: Path | None, db: Path | None) -> None:
    """Print {"seq", "keys", "sha256"}: sha256 over all pairs in key order (docs/wal.md)."""
    if (data_dir is None) == (db is None):
        raise ConfigError("give exactly one of --data-dir or --db")
    path = db if db is not None else Path(data_dir or ".") / "state.db"
    click.echo(json.dumps(digest_file(path).to_json()))
