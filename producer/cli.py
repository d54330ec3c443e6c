"""Command groups of the producer side, looked up by walship.shared.cli.main.

``writer_group`` lives in writer_cli; ``producer_group`` and ``topic_group`` in
publisher_cli, imported only when asked for (the publisher pulls in aiokafka).
"""

from __future__ import annotations

import importlib
from typing import Any

from walship.producer.writer_cli import writer_group

__all__ = ["writer_group"]  # plus the lazy names below

_LAZY = {
    "producer_group": "walship.producer.publisher_cli",
    "topic_group": "walship.producer.publisher_cli",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        raise AttributeError(f"{name} is not available: {module} is not installed") from exc
