"""The bench workload: 16-byte keys, 100-byte values, 10-entry transactions.

The walship runs drive the product's load generator
(:func:`walship.producer.loadgen.run_load`); the naive pipeline uses the same
generator for its entries, so both carry identical keys and values.
"""

from __future__ import annotations

import time

KEY_BYTES = 16
VALUE_BYTES = 100
TXN_ENTRIES = 10
# Bytes of one entry's key+value: what "MB/s" counts everywhere in the report.
ENTRY_PAYLOAD_BYTES = KEY_BYTES + VALUE_BYTES
PARTITIONS = 12


def payload_mb(entries: int) -> float:
    """Megabytes (1e6) of key+value payload in ``entries`` entries."""
    return entries * ENTRY_PAYLOAD_BYTES / 1e6


def now() -> float:
    """The clock every bench process stamps events with.

    CLOCK_MONOTONIC is one clock for all processes of a Linux machine, so
    timestamps taken in the writer, publisher and reader processes compare
    directly (and NTP steps cannot bend a measurement).
    """
    return time.monotonic()
