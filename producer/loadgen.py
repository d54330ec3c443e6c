"""A deterministic load generator for a Writer (``walship writer load``).

The same seed and parameters always produce the same transactions in the same
sequence order, so two runs yield the same digest. Appends are pipelined
(``concurrency`` in flight) so group commit can share fsyncs; they are issued
in generation order and the WAL queues them in that order.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from walship.shared.model import Op, Transaction


class Appender(Protocol):
    async def append(
        self,
        ops_keys_values: list[tuple[Op, bytes, bytes]],
        *,
        timestamp_us: int | None = None,
        traceparent: str | None = None,
    ) -> Transaction: ...


@dataclass(frozen=True)
class LoadResult:
    entries: int
    txns: int
    first_seq: int  # 0 when nothing was appended
    last_seq: int
    elapsed_s: float

    @property
    def entries_per_s(self) -> float:
        return self.entries / self.elapsed_s if self.elapsed_s > 0 else 0.0


# An odd 128-bit multiplier (the golden ratio's fraction): index -> index * A
# mod 2**bits is a bijection whose high bytes spread consecutive indexes
# uniformly over the key space, at a fraction of a hash call's cost.
_KEY_MULTIPLIER = 0x9E3779B97F4A7C15F39CC0605CEDC835


def _key_mixer(key_bytes: int) -> tuple[int, int]:
    """(odd multiplier, mask) for keys of ``key_bytes`` bytes."""
    mask = (1 << (8 * key_bytes)) - 1
    mult = 0
    for shift in range(0, 8 * key_bytes, 128):
        mult |= _KEY_MULTIPLIER << shift
    return (mult & mask) | 1, mask


def key_for(index: int, key_bytes: int = 16) -> bytes:
    """Key ``index`` of the key space: spread uniformly (like real keys), fixed per index.

    Distinct for distinct indexes below ``2 ** (8 * key_bytes)``.
    """
    mult, mask = _key_mixer(key_bytes)
    return (((index + 1) * mult) & mask).to_bytes(key_bytes, "big")


def generate_txn(
    rng: random.Random, n: int, *, keys: int, value_bytes: int, delete_ratio: float, key_bytes: int
) -> list[tuple[Op, bytes, bytes]]:
    """One transaction of ``n`` entries (pure given the rng state).

    The keys are ``key_for(index)`` of indexes drawn with ``rng.random()``; the
    values are slices of one random buffer drawn per transaction (one rng call
    instead of one per entry).
    """
    mult, mask = _key_mixer(key_bytes)
    rand = rng.random
    buf = rng.randbytes(n * value_bytes)
    out: list[tuple[Op, bytes, bytes]] = []
    at = 0
    for _ in range(n):
        key = (((int(rand() * keys) + 1) * mult) & mask).to_bytes(key_bytes, "big")
        if delete_ratio and rand() < delete_ratio:
            out.append((Op.DELETE, key, b""))
        else:
            out.append((Op.PUT, key, buf[at : at + value_bytes]))
            at += value_bytes
    return out


async def run_load(
    writer: Appender,
    *,
    entries: int,
    keys: int = 100_000,
    value_bytes: int = 100,
    txn_entries: int = 10,
    rate_per_s: float | None = None,
    delete_ratio: float = 0.0,
    seed: int = 0,
    key_bytes: int = 16,
    concurrency: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> LoadResult:
    """Append ``entries`` entries in transactions of ``txn_entries``; ``progress(done, total)``.

    ``rate_per_s`` caps entries per second (None: as fast as the writer goes).
    """
    if entries < 0 or keys < 1 or txn_entries < 1 or concurrency < 1 or value_bytes < 0:
        raise ValueError("entries >= 0, keys >= 1, txn_entries >= 1, value_bytes >= 0 required")
    if not 0.0 <= delete_ratio <= 1.0:
        raise ValueError("delete_ratio must be within 0..1")
    if rate_per_s is not None and rate_per_s <= 0:
        raise ValueError("rate_per_s must be > 0")
    rng = random.Random(seed)
    slots = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[Transaction]] = set()
    failures: list[BaseException] = []
    first_seq = 0
    last_seq = 0
    done = 0
    txns = 0
    start = time.monotonic()

    def finished(task: asyncio.Task[Transaction]) -> None:
        nonlocal first_seq, last_seq, done
        tasks.discard(task)
        slots.release()
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            failures.append(exc)
            return
        txn = task.result()
        first_seq = txn.first_seq if first_seq == 0 else min(first_seq, txn.first_seq)
        last_seq = max(last_seq, txn.last_seq)
        done += len(txn)
        if progress is not None:
            progress(done, entries)

    generated = 0
    try:
        while generated < entries and not failures:
            n = min(txn_entries, entries - generated)
            batch = generate_txn(
                rng,
                n,
                keys=keys,
                value_bytes=value_bytes,
                delete_ratio=delete_ratio,
                key_bytes=key_bytes,
            )
            if rate_per_s is not None:
                due = start + generated / rate_per_s
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await slots.acquire()
            # The task's first step queues the append; tasks start in creation
            # order, so sequences follow generation order.
            task = asyncio.create_task(writer.append(batch))
            tasks.add(task)
            task.add_done_callback(finished)
            generated += n
            txns += 1
        if tasks:
            await asyncio.wait(set(tasks))
    finally:
        for t in list(tasks):
            t.cancel()
    if failures:
        raise failures[0]
    return LoadResult(
        entries=done,
        txns=txns,
        first_seq=first_seq,
        last_seq=last_seq,
        elapsed_s=time.monotonic() - start,
    )
