"""The README's generated references match the code (they cannot drift)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gen_cli_reference.py"


def _script():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gen_cli_reference", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_cli_reference"] = module
    spec.loader.exec_module(module)
    return module


def test_readme_cli_reference_is_current() -> None:
    script = _script()
    readme = script.README.read_text(encoding="utf-8")
    section = readme.split(script.START, 1)[1].split(script.END, 1)[0]
    assert section == "\n" + script.render(), (
        "README.md's CLI reference is stale: run python scripts/gen_cli_reference.py"
    )


def test_cli_reference_lists_every_command() -> None:
    rendered = _script().render()
    for command in (
        "walship producer run",
        "walship consumer run",
        "walship writer load",
        "walship topic create",
        "walship topic describe",
        "walship snapshot create",
        "walship snapshot list",
        "walship snapshot verify",
        "walship snapshot restore",
        "walship status",
        "walship digest",
        "walship verify",
        "walship devcluster",
        "walship demo",
        "walship bench",
        "walship chaos",
    ):
        assert f"| `{command}` |" in rendered, command
