"""Payload encryption at rest: keyring, encrypted messages and chunks, settings, end to end."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from walship.shared.codec import (
    FLAG_ENCRYPTED,
    HEADER_BYTES,
    Decoder,
    Encoder,
    PartAssembler,
    peek_header,
)
from walship.shared.crypto import OVERHEAD_BYTES, Keyring, decode_key
from walship.shared.errors import ConfigError, DecodeError, SnapshotCorruptError
from walship.shared.model import Op, Transaction, WriterId
from walship.shared.settings import effective_settings, load_settings
from walship.shared.snapshot.format import (
    CHUNK_HEADER_BYTES,
    chunk_info,
    decode_chunk,
    encode_chunk,
)

WRITER = WriterId(stream_id=bytes(range(16)), epoch=3)
KEY1 = bytes(range(32))
KEY2 = bytes(range(100, 132))
SECRET = b"the-plaintext-nobody-may-see"


def ring(*ids: int, current: int | None = None) -> Keyring:
    keys = {1: KEY1, 2: KEY2}
    return Keyring({i: keys[i] for i in ids}, current)


def txns(count: int = 3, first: int = 1) -> list[Transaction]:
    out = []
    seq = first
    for i in range(count):
        t = Transaction.of(
            seq,
            [(Op.PUT, b"user:%d" % i, SECRET * 3), (Op.DELETE, b"gone:%d" % i, b"")],
            1_700_000_000_000_000 + i,
        )
        out.append(t)
        seq = t.last_seq + 1
    return out


def encrypted_value(current: int = 1) -> bytes:
    (msg,) = Encoder(WRITER, keyring=ring(1, 2, current=current)).encode(txns())
    return msg.value


# --- the keyring ---------------------------------------------------------------------


def test_keyring_round_trip_and_overhead() -> None:
    k = ring(1, current=1)
    sealed = k.encrypt(1, b"hello", b"aad")
    assert len(sealed) == 5 + OVERHEAD_BYTES and sealed[:4] == b"\x00\x00\x00\x01"
    assert k.decrypt(sealed, b"aad", what="x") == b"hello"
    assert k.encrypt(1, b"hello", b"aad") != sealed  # fresh nonce each time
    with pytest.raises(DecodeError, match="wrong key or tampered"):
        k.decrypt(sealed, b"other aad", what="x")
    with pytest.raises(DecodeError, match="shorter"):
        k.decrypt(sealed[:20], b"aad", what="x")
    assert "KEY" not in repr(k) and KEY1.hex() not in repr(k)


def test_keyring_refuses_bad_keys() -> None:
    with pytest.raises(ValueError, match="32"):
        Keyring({1: b"short"})
    with pytest.raises(ValueError, match="key id"):
        Keyring({0: KEY1})
    with pytest.raises(ValueError, match="not in the keyring"):
        Keyring({1: KEY1}, current_id=2)
    with pytest.raises(ValueError, match="base64"):
        decode_key("not base64!")


# --- messages ------------------------------------------------------------------------


def test_encrypted_message_round_trip_and_no_plaintext() -> None:
    batch_txns = txns()
    (plain,) = Encoder(WRITER).encode(batch_txns)
    (enc,) = Encoder(WRITER, keyring=ring(1, current=1)).encode(batch_txns)
    h = peek_header(enc.value)
    assert h.encrypted and h.flags == FLAG_ENCRYPTED
    assert h.compressed_bytes == len(enc.value) - HEADER_BYTES
    assert h.compressed_bytes == peek_header(plain.value).compressed_bytes + OVERHEAD_BYTES
    assert SECRET not in enc.value and b"user:" not in enc.value
    assert Decoder(keyring=ring(1)).decode(enc.value) == Decoder().decode(plain.value)


def test_keyring_without_current_id_encrypts_nothing() -> None:
    (a,) = Encoder(WRITER).encode(txns())
    (b,) = Encoder(WRITER, keyring=ring(1)).encode(txns())
    assert a.value == b.value


def test_encrypted_incompressible_and_split_transactions_fit() -> None:
    big = Transaction.of(1, [(Op.PUT, b"k%d" % i, os.urandom(3000)) for i in range(40)], 5)
    msgs = Encoder(WRITER, message_bytes_max=20_000, keyring=ring(1, current=1)).encode([big])
    assert len(msgs) > 1 and all(len(m.value) <= 20_000 for m in msgs)
    dec, asm = Decoder(keyring=ring(1)), PartAssembler()
    out = [asm.feed(dec.decode(m.value)) for m in msgs]
    whole = out[-1]
    assert whole is not None and list(whole.values) == list(big.values)


@pytest.mark.parametrize(
    ("where", "offset"),
    [
        ("header first_seq", 15),
        ("header epoch", 71),
        ("header crc", 75),
        ("key id", HEADER_BYTES + 3),
        ("nonce", HEADER_BYTES + 4 + 5),
        ("ciphertext", HEADER_BYTES + 16 + 2),
        ("tag", -1),
    ],
)
def test_tampering_is_detected(where: str, offset: int) -> None:
    value = bytearray(encrypted_value())
    value[offset] ^= 0x01
    with pytest.raises(DecodeError) as info:
        Decoder(keyring=ring(1, 2)).decode(bytes(value))
    if where not in ("header first_seq", "key id"):
        assert "wrong key or tampered" in str(info.value)


def test_unknown_key_and_missing_keyring_name_the_key() -> None:
    value = encrypted_value(current=2)
    with pytest.raises(DecodeError, match=r"encrypted with key 2.*configure encryption_keys"):
        Decoder().decode(value)
    with pytest.raises(DecodeError, match=r"encrypted with key 2.*holds: 1"):
        Decoder(keyring=ring(1)).decode(value)
    # Same id, different key bytes: the tag fails.
    with pytest.raises(DecodeError, match="wrong key or tampered"):
        Decoder(keyring=Keyring({2: KEY1})).decode(value)


def test_key_rotation_readers_hold_old_and_new() -> None:
    old = Encoder(WRITER, keyring=ring(1, current=1)).encode(txns(2, first=1))
    new = Encoder(WRITER, keyring=ring(1, 2, current=2)).encode(txns(2, first=5))
    assert peek_header(old[0].value).encrypted and old[0].value[76:80] == b"\x00\x00\x00\x01"
    assert new[0].value[76:80] == b"\x00\x00\x00\x02"
    dec = Decoder(keyring=ring(1, 2))
    assert [dec.decode(m.value).first_seq for m in old + new] == [1, 5]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_encrypted_decode_only_raises_decode_error(data: st.DataObject) -> None:
    value = bytearray(encrypted_value())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(value) - 1))
        value[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(value)))
    tail = data.draw(st.binary(max_size=40))
    mutated = bytes(value[:cut]) + tail
    with contextlib.suppress(DecodeError):
        Decoder(keyring=ring(1, 2)).decode(mutated)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_arbitrary_payload_after_an_encrypted_header(payload: bytes) -> None:
    header = bytearray(encrypted_value()[:HEADER_BYTES])
    header[44:48] = len(payload).to_bytes(4, "big")
    with contextlib.suppress(DecodeError):
        Decoder(keyring=ring(1, 2)).decode(bytes(header) + payload)


# --- snapshot chunks -----------------------------------------------------------------


def test_encrypted_chunk_round_trip_tamper_and_unknown_key() -> None:
    keys = [b"key-%03d" % i for i in range(50)]
    values = [SECRET + b"%d" % i for i in range(50)]
    frame = encode_chunk(keys, values, keyring=ring(1, current=1))
    assert SECRET not in frame and b"key-" not in frame
    info = chunk_info(0, frame, keys)
    assert info.first_key == b""  # stays out of the plaintext manifest
    assert decode_chunk(frame, snapshot_id="s", index=0, info=info, keyring=ring(1)) == (
        keys,
        values,
    )
    assert chunk_info(0, encode_chunk(keys, values), keys).first_key == keys[0]
    for offset in (11, 20, CHUNK_HEADER_BYTES + 6, CHUNK_HEADER_BYTES + 20, len(frame) - 1):
        bad = bytearray(frame)
        bad[offset] ^= 0x01
        with pytest.raises(SnapshotCorruptError, match="wrong key or tampered"):
            decode_chunk(bytes(bad), snapshot_id="s", index=0, keyring=ring(1))
    with pytest.raises(SnapshotCorruptError, match=r"encrypted with key 1.*encryption_keys"):
        decode_chunk(frame, snapshot_id="s", index=0)
    bad_flags = bytearray(frame)
    bad_flags[7] |= 0x02
    with pytest.raises(SnapshotCorruptError, match="unknown flags"):
        decode_chunk(bytes(bad_flags), snapshot_id="s", index=0, keyring=ring(1))


# --- settings ------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("WALSHIP_"):
            monkeypatch.delenv(name)


B64_1 = base64.b64encode(KEY1).decode()
B64_2 = base64.b64encode(KEY2).decode()


@pytest.mark.usefixtures("clean_env")
def test_settings_keyring_from_env_and_masking(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WALSHIP_ENCRYPTION_KEYS", json.dumps({"1": B64_1, "2": B64_2}))
    monkeypatch.setenv("WALSHIP_ENCRYPTION_KEY_ID", "2")
    s = load_settings()
    k = s.keyring()
    assert k is not None and k.current_id == 2 and k.key_ids == {1, 2}
    shown = json.dumps(effective_settings(s))
    assert B64_1 not in shown and B64_2 not in shown and B64_1 not in repr(s)
    from walship.shared.cli.main import main

    result = CliRunner().invoke(main, ["config", "show", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["settings"]["encryption_keys"] == {
        "1": "**********",
        "2": "**********",
    }
    assert B64_1 not in result.output and B64_2 not in result.output


@pytest.mark.usefixtures("clean_env")
def test_settings_without_keys_have_no_keyring() -> None:
    assert load_settings().keyring() is None


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"encryption_keys": {"1": "not base64!"}}, "encryption_keys .*key 1 is not valid base64"),
        (
            {"encryption_keys": {"1": base64.b64encode(b"sixteen byte key").decode()}},
            "key 1 must decode to 32 bytes",
        ),
        ({"encryption_keys": {"0": B64_1}}, "key id 0 is not in 1..4294967295"),
        (
            {"encryption_keys": {"1": B64_1}, "encryption_key_id": 3},
            r"encryption_key_id = 3 .*names no key of encryption_keys \(ids: 1\)",
        ),
        ({"encryption_key_id": 1}, r"names no key of encryption_keys \(ids: none\)"),
        (
            {
                "encryption_keys": {"1": B64_1},
                "encryption_key_id": 1,
                "producer": {"zstd_dictionary": True},
            },
            "producer.zstd_dictionary .*shipped unencrypted",
        ),
    ],
)
def test_settings_validation_names_the_setting_never_the_key(
    overrides: dict[str, object], match: str
) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        load_settings(**overrides)
    text = str(info.value)
    assert B64_1 not in text and "sixteen" not in text and "c2l4dGVlbi" not in text


# --- end to end on the embedded cluster ----------------------------------------------


async def _consume_raw(servers: str, topic: str) -> list[bytes]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=servers, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    try:
        out: list[bytes] = []
        for _ in range(20):
            batches = await consumer.getmany(timeout_ms=500)
            got = [r.value for rs in batches.values() for r in rs if r.value is not None]
            if not got and out:
                break
            out.extend(got)
        return out
    finally:
        await consumer.stop()


@pytest.mark.kafka
async def test_end_to_end_encrypted_stream(
    tmp_path: Path, kafka_bootstrap: str, new_topic: object
) -> None:
    from walship.consumer.applier import SqliteApplier
    from walship.consumer.reader import Reader
    from walship.producer.publisher import Publisher
    from walship.producer.writer import Writer
    from walship.shared.store import digest_file

    topic = new_topic(3)  # type: ignore[operator]
    data = tmp_path / "writer"
    async with Writer(data) as writer:
        for i in range(200):
            await writer.append([(Op.PUT, b"k%03d" % (i % 50), SECRET + b"-%d" % i)])
        async with Publisher(
            data,
            topic=topic,
            partitions=3,
            producer_kwargs={"bootstrap_servers": kafka_bootstrap},
            keyring=ring(1, current=1),
        ) as pub:
            await pub.run(until_caught_up=True)
        final = writer.last_seq
        await writer.wait_applied(final)  # type: ignore[attr-defined]
    expected = digest_file(data / "state.db")
    assert expected.seq == final

    raw = await _consume_raw(kafka_bootstrap, topic)
    assert raw and all(peek_header(v).encrypted for v in raw)
    assert not any(SECRET in v for v in raw)

    kwargs = {"bootstrap_servers": kafka_bootstrap}
    # A reader with the keyring replicates exactly.
    applier = SqliteApplier(tmp_path / "a.db")
    reader = Reader(
        applier,
        topic=topic,
        reader_id="with-key",
        client_kwargs=kwargs,
        decoder=Decoder(keyring=ring(1, 2)),
    )
    async with reader:
        await asyncio.wait_for(reader.run(until_seq=final), 60)
    applier.close()
    assert digest_file(tmp_path / "a.db") == expected

    # A reader without it stops with the clear error and applies nothing.
    applier = SqliteApplier(tmp_path / "b.db")
    reader = Reader(applier, topic=topic, reader_id="no-key", client_kwargs=kwargs)
    with pytest.raises(DecodeError, match=r"encrypted with key 1.*configure encryption_keys"):
        async with reader:
            await asyncio.wait_for(reader.run(until_seq=final), 60)
    applier.close()
    assert digest_file(tmp_path / "b.db").seq == 0


def test_docs_decrypt_snippet_reads_encrypted_messages() -> None:
    import re

    text = (Path(__file__).parent.parent / "docs" / "wire-format.md").read_text()
    decrypt = re.search(r"## Encryption.*?```python\n(.*?)```", text, re.S)
    decoder = re.search(r"## A decoder in 15 lines.*?```python\n(.*?)```", text, re.S)
    assert decrypt is not None and decoder is not None
    code = decoder.group(1).replace("flags == 0", "flags in (0, 1)")
    code = code.replace("body = value[76:]", "body = decrypt_payload(value, keys)")
    code = code.replace(
        "dictionaries: dict[int, bytes] | None = None", "keys: dict, dictionaries=None"
    )
    assert code != decoder.group(1)
    namespace: dict[str, object] = {}
    exec(decrypt.group(1) + code, namespace)
    decode = namespace["decode"]
    for value in (encrypted_value(current=1), encrypted_value(current=2)):
        got = decode(value, {1: KEY1, 2: KEY2})  # type: ignore[operator]
        assert got["first_seq"] == 1 and got["values"][0] == SECRET * 3


async def test_encrypted_snapshot_bootstrap_resumes_and_verify_needs_the_key(
    tmp_path: Path,
) -> None:
    from collections import Counter

    from walship.consumer.bootstrap import Bootstrapper, LogView
    from walship.shared.model import Batch
    from walship.shared.snapshot import FileSnapshotStore
    from walship.shared.snapshot.base import verify_snapshot
    from walship.shared.snapshot.create import create_snapshot
    from walship.shared.snapshot.progress import NullProgress
    from walship.shared.store import ReplicaStore, digest_file

    snaps = FileSnapshotStore(tmp_path / "snaps")
    with ReplicaStore(tmp_path / "src.db") as src:
        ops = [(Op.PUT, b"k%05d" % i, SECRET + b"%d" % i) for i in range(1000)]
        src.apply([Batch.from_transactions(WRITER, [Transaction.of(1, ops, 7)])], offsets={0: 3})
        m = await create_snapshot(
            src, snaps, topic="t", partitions=1, chunk_keys=100, keyring=ring(1, current=1)
        )
        expected = src.digest()
    assert len(m.chunks) == 10 and all(c.first_key == b"" for c in m.chunks)
    stored = b"".join([await snaps.get_chunk(m.snapshot_id, i) for i in range(10)])
    assert SECRET not in stored
    assert (await verify_snapshot(snaps, m, keyring=ring(1))).ok
    report = await verify_snapshot(snaps, m, raise_on_error=False)
    assert not report.ok and "configure encryption_keys" in report.problems[0]

    async def inspect() -> LogView:
        return LogView(1, {0: 0}, {0: 3}, {0: 1})

    class Crash(Exception):
        pass

    loads: Counter[int] = Counter()
    crash_at = [3, 7]

    def on_loaded(index: int) -> None:
        loads[index] += 1
        if crash_at and index == crash_at[0]:  # committed, progress not yet recorded
            crash_at.pop(0)
            raise Crash(index)

    def make(keyring: Keyring | None) -> Bootstrapper:
        return Bootstrapper(
            tmp_path / "replica.db",
            snaps,
            topic="t",
            inspect_log=inspect,
            progress=lambda _: NullProgress("bootstrap"),
            on_chunk_loaded=on_loaded,
            keyring=keyring,
        )

    with pytest.raises(SnapshotCorruptError, match="encrypted with key 1"):
        await make(None)("expired")
    assert not (tmp_path / "replica.db").exists()
    cp = None
    for _ in range(3):
        try:
            cp = await make(ring(1))("expired")
            break
        except Crash:
            continue
    assert cp is not None and cp.applied_seq == 1000
    assert digest_file(tmp_path / "replica.db") == expected
    # Without first keys in the manifest, only the chunk committed at the crash is reloaded.
    assert loads == Counter({**dict.fromkeys(range(10), 1), 3: 2, 7: 2})


@pytest.mark.kafka
def test_cli_processes_replicate_an_encrypted_stream(
    tmp_path: Path, kafka_bootstrap: str, new_topic: Callable[..., str]
) -> None:
    """writer load, producer run and consumer run as processes, keys from the environment:
    the keyed reader equals the writer; a reader without the keys exits 1, naming the key."""
    import subprocess
    import sys

    from walship.shared.store import digest_file

    topic = new_topic(3)
    key = base64.b64encode(os.urandom(32)).decode()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("WALSHIP_")}
    base_env.update(
        WALSHIP_KAFKA__BOOTSTRAP_SERVERS=kafka_bootstrap,
        WALSHIP_TOPIC__NAME=topic,
        WALSHIP_TOPIC__PARTITIONS="3",
    )
    keyed = {
        **base_env,
        "WALSHIP_ENCRYPTION_KEYS": json.dumps({"7": key}),
        "WALSHIP_ENCRYPTION_KEY_ID": "7",
    }

    def walship(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "walship.shared.cli.main", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    w = tmp_path / "w"
    for args in (
        ("writer", "load", "--data-dir", str(w), "--entries", "2000", "--keys", "300"),
        ("producer", "run", "--data-dir", str(w), "--until-caught-up"),
    ):
        done = walship(keyed, *args)
        assert done.returncode == 0, done.stderr
    done = walship(
        keyed,
        "consumer",
        "run",
        "--data-dir",
        str(tmp_path / "r"),
        "--reader-id",
        "keyed",
        "--until-seq",
        "2000",
    )
    assert done.returncode == 0, done.stderr
    assert digest_file(tmp_path / "r" / "state.db") == digest_file(w / "state.db")

    done = walship(
        base_env,
        "consumer",
        "run",
        "--data-dir",
        str(tmp_path / "nokey"),
        "--reader-id",
        "nokey",
        "--until-seq",
        "2000",
    )
    assert done.returncode == 1
    assert "encrypted with key 7" in done.stderr and key not in done.stderr
    assert digest_file(tmp_path / "nokey" / "state.db").seq == 0
