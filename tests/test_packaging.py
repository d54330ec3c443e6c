"""The distribution ships every package of the tree, under walship.* names only."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_directory_is_listed_in_pyproject() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = config["package-dir"]
    assert mapping == {
        "walship.producer": "producer",
        "walship.consumer": "consumer",
        "walship.shared": "shared",
    }
    found = set()
    for name, directory in mapping.items():
        for init in (ROOT / directory).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / directory)
            found.add(".".join([name, *rel.parts]))
    assert set(config["packages"]) == found
    # Never a generic top-level name like `producer` or `shared`.
    assert all(p.startswith("walship.") for p in config["packages"])
