"""``walship verify A B``: are two SQLite stores the same state?

Two stores are equal only at the same sequence: a replica that is behind is
not "equal minus lag", it is a different state. Exit 0 when equal, 1 when not.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from walship.shared.cli.options import json_option
from walship.shared.store import Digest, digest_file

STORE_FILE = "state.db"


def resolve_store(path: Path) -> Path:
    """A store file, or a data directory holding ``state.db`` (or exactly one ``*.db``)."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise click.BadParameter(f"{str(path)!r} is neither a store file nor a directory")
    if (path / STORE_FILE).is_file():
        return path / STORE_FILE
    candidates = sorted(p for p in path.glob("*.db") if p.is_file())
    if len(candidates) == 1:
        return candidates[0]
    found = ", ".join(p.name for p in candidates) or "no *.db file"
    raise click.BadParameter(
        f"{str(path)!r} has no {STORE_FILE} and not exactly one *.db file ({found}); name the file"
    )


def differences(a: Digest, b: Digest) -> list[str]:
    """What differs between two digests, in words (empty when equal)."""
    found: list[str] = []
    if a.seq != b.seq:
        found.append(
            f"seq {a.seq} != {b.seq}: the stores are at different positions "
            "(compare again once both applied the same seq)"
        )
    if a.keys != b.keys:
        found.append(f"keys {a.keys} != {b.keys}")
    if a.sha256 != b.sha256:
        found.append(f"sha256 {a.sha256[:16]}... != {b.sha256[:16]}...")
    return found


@click.command("verify")
@click.argument("store_a", type=click.Path(exists=True, path_type=Path))
@click.argument("store_b", type=click.Path(exists=True, path_type=Path))
@json_option
@click.pass_context
def verify_cmd(ctx: click.Context, store_a: Path, store_b: Path, as_json: bool) -> None:
    """Compare two stores (data directories or .db files) by digest.

    Exit code 0 if they hold the same state at the same seq, 1 if not.
    """
    path_a, path_b = resolve_store(store_a), resolve_store(store_b)
    digest_a, digest_b = digest_file(path_a), digest_file(path_b)
    found = differences(digest_a, digest_b)
    if as_json:
        result = {
            "equal": not found,
            "a": {"path": str(path_a), **digest_a.to_json()},
            "b": {"path": str(path_b), **digest_b.to_json()},
            "differences": found,
        }
        click.echo(json.dumps(result, indent=2))
    else:
        width = max(len(str(path_a)), len(str(path_b)))
        for path, d in ((path_a, digest_a), (path_b, digest_b)):
            click.echo(f"{path!s:<{width}}  seq={d.seq} keys={d.keys} sha256={d.sha256}")
        if found:
            click.echo("DIFFERENT: " + "; ".join(found))
        else:
            click.echo(f"EQUAL at seq {digest_a.seq}")
    if found:
        ctx.exit(1)
