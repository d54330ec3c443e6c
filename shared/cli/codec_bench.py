"""Codec micro-benchmark: encode/decode throughput on one core, and compression ratios.

``python -m walship.shared.cli.codec_bench [--entries N]`` prints the figures as JSON.

Throughput: 16-byte random keys, 100-byte JSON-ish values, 10-entry transactions,
encoded the way the publisher does (greedy messages up to the default size),
decoded including CRC check, decompression, msgpack and shape validation.
Ratios: one-transaction messages of realistic JSON records (the case where
latency-driven publishing sends small messages), with and without a zstd
dictionary trained on other records of the same shape.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from walship.shared.codec import (
    HEADER_BYTES,
    Decoder,
    EncodedMessage,
    Encoder,
    train_dictionary,
    training_samples,
)
from walship.shared.model import Op, Transaction, WriterId

_WRITER = WriterId(stream_id=bytes(16), epoch=1)
_TXN_ENTRIES = 10
_VALUE_BYTES = 100


def _value(rng: random.Random, seq: int) -> bytes:
    ok = "true" if rng.random() < 0.5 else "false"
    user, score = rng.randrange(100_000), rng.randrange(10_000)
    text = f'{{"id":{seq},"user":"u{user:05d}","score":{score},"ok":{ok},"note":"'
    pad = rng.randbytes(16).hex()
    return (text + pad * 4)[: _VALUE_BYTES - 2].encode() + b'"}'


def _throughput_txns(entries: int, seed: int = 1) -> list[Transaction]:
    rng = random.Random(seed)
    txns = []
    for first in range(1, entries + 1, _TXN_ENTRIES):
        n = min(_TXN_ENTRIES, entries - first + 1)
        txns.append(
            Transaction(
                first_seq=first,
                ops=bytes(n),
                keys=[rng.randbytes(16) for _ in range(n)],
                values=[_value(rng, first + i) for i in range(n)],
                timestamp_us=1_700_000_000_000_000 + first,
            )
        )
    return txns


_NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
_CITIES = ["Berlin", "Lisbon", "Oslo", "Paris", "Rome", "Vienna", "Warsaw"]


def _record_txns(count: int, first_seq: int, seed: int) -> list[Transaction]:
    """One-entry transactions holding JSON user records (~150-200 bytes)."""
    rng = random.Random(seed)
    txns = []
    for i in range(count):
        uid = rng.randrange(10**7)
        name = rng.choice(_NAMES)
        record = {
            "id": uid,
            "name": name,
            "email": f"{name}.{rng.randrange(1000)}@example.com",
            "city": rng.choice(_CITIES),
            "active": rng.random() < 0.7,
            "balance": round(rng.random() * 10_000, 2),
            "updated_at": 1_700_000_000 + rng.randrange(10**6),
        }
        value = json.dumps(record, separators=(",", ":")).encode()
        txns.append(Transaction.of(first_seq + i, [(Op.PUT, b"user:%08d" % uid, value)], i))
    return txns


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _small_message_bytes(encoder: Encoder, txns: Sequence[Transaction]) -> tuple[int, int]:
    """(total message bytes, total payload bytes) when each txn is its own message."""
    total = payload = 0
    for t in txns:
        for m in encoder.encode([t]):
            total += len(m.value)
            payload += len(m.value) - HEADER_BYTES
    return total, payload


def run_codec_bench(entries: int = 200_000) -> dict[str, Any]:
    """Measure the codec on this machine's single core; returns the figures."""
    if entries < _TXN_ENTRIES:
        raise ValueError(f"entries must be >= {_TXN_ENTRIES}")
    txns = _throughput_txns(entries)
    encoder = Encoder(_WRITER)
    decoder = Decoder()
    repeats = 3
    messages: list[EncodedMessage] = encoder.encode(txns)
    encode_s = _best_seconds(lambda: encoder.encode(txns), repeats)

    def decode_all() -> None:
        for m in messages:
            decoder.decode(m.value)

    decode_s = _best_seconds(decode_all, repeats)
    body_bytes = sum(m.body_bytes for m in messages)
    wire_bytes = sum(len(m.value) for m in messages)

    train = _record_txns(5000, 1, seed=11)
    test = _record_txns(2000, 10_001, seed=12)
    dictionary = train_dictionary(training_samples(train), size_bytes=16384)
    raw_bytes = sum(len(b) for b in training_samples(test))
    plain_total, plain_payload = _small_message_bytes(Encoder(_WRITER), test)
    dict_total, dict_payload = _small_message_bytes(Encoder(_WRITER, dictionary=dictionary), test)
    dict_decoder = Decoder(dictionaries={dictionary.dict_id: dictionary})
    dict_msgs = [m for t in test for m in Encoder(_WRITER, dictionary=dictionary).encode([t])]
    dict_decode_s = _best_seconds(
        lambda: [dict_decoder.decode(m.value) for m in dict_msgs], repeats
    )

    return {
        "entries": entries,
        "txn_entries": _TXN_ENTRIES,
        "key_bytes": 16,
        "value_bytes": _VALUE_BYTES,
        "messages": len(messages),
        "encode_entries_per_s": round(entries / encode_s),
        "decode_entries_per_s": round(entries / decode_s),
        "encode_mb_per_s": round(body_bytes / encode_s / 1e6, 1),
        "decode_mb_per_s": round(body_bytes / decode_s / 1e6, 1),
        "batch_compression_ratio": round(body_bytes / wire_bytes, 2),
        "small": {
            "messages": len(test),
            "mean_body_bytes": round(raw_bytes / len(test), 1),
            "dict_bytes": len(dictionary.data),
            "dict_id": dictionary.dict_id,
            "ratio_without_dict": round(raw_bytes / plain_payload, 2),
            "ratio_with_dict": round(raw_bytes / dict_payload, 2),
            "mean_message_bytes_without_dict": round(plain_total / len(test), 1),
            "mean_message_bytes_with_dict": round(dict_total / len(test), 1),
            "dict_decode_messages_per_s": round(len(test) / dict_decode_s),
        },
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--entries", type=int, default=200_000)
    args = parser.parse_args(argv)
    print(json.dumps(run_codec_bench(args.entries), indent=2))


if __name__ == "__main__":
    main()
