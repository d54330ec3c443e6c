"""The snapshot format: chunk frames, the manifest, snapshot ids and the digest.

Pure: bytes in, bytes out, no I/O. docs/snapshot-format.md documents every field.

A snapshot is the full key/value state of a stream at sequence ``seq`` plus, per
Kafka partition, the offset from which a reader continues after ``seq``. It is
stored as numbered chunks and one manifest. The manifest is written last: a
snapshot without a manifest does not exist, so an interrupted ``create`` leaves
only garbage that listing ignores and retention removes.

Chunk frame (big-endian)::

    0  magic     4  b"WSNC"
    4  version   1  CHUNK_VERSION
    5  codec     1  1 = zstd
    6  flags     2  bit 0 ENCRYPTED (CHUNK_FLAG_ENCRYPTED); other bits must be 0
    8  keys      4  number of key/value pairs
    12 body      4  uncompressed body length
    16 payload   4  stored payload length (= frame length - 24)
    20 crc32c    4  CRC32C over bytes 0..19 and the *uncompressed* body
    24 payload      zstd(msgpack([keys: list[bin], values: list[bin]]))

Encrypted chunks (flags bit 0, shared/crypto.py) store the payload as key_id
(u32) + nonce (12) + AES-256-GCM(zstd frame) + tag (16), with the 24-byte
header (crc included) as associated data. Manifests stay plaintext JSON: they
hold counts, offsets, the SHA-256 state digest and each chunk's first key in
hex; a first key is user data, so an encrypted chunk's first_key is left empty.

Every length is checked against a bound before anything is allocated, so a
corrupt or hostile chunk costs at most ``body_bytes_max`` of memory.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import crc32c
import msgpack
import zstandard
from walship.shared.crypto import OVERHEAD_BYTES as _CRYPTO_OVERHEAD
from walship.shared.crypto import Keyring
from walship.shared.errors import DecodeError, SnapshotCorruptError

FORMAT_VERSION = 1
CHUNK_VERSION = 1
CHUNK_MAGIC = b"WSNC"
CODEC_ZSTD = 1
CHUNK_FLAG_ENCRYPTED = 0x0001
_CHUNK_KNOWN_FLAGS = CHUNK_FLAG_ENCRYPTED
_HEADER = struct.Struct(">4sBBHIII")  # magic, version, codec, flags, keys, body, payload
_CRC = struct.Struct(">I")
CHUNK_HEADER_BYTES = _HEADER.size + _CRC.size  # 24

BODY_BYTES_MAX_DEFAULT = 64 << 20
MANIFEST_BYTES_MAX = 16 << 20

# seq (20 digits) "-" created_at_us (20 digits): string order = (seq, time) order.
_ID_RE = re.compile(r"^(\d{20})-(\d{20})$")


def make_snapshot_id(seq: int, created_at_us: int) -> str:
    """A sortable id: newer sequence first, then newer creation time."""
    return f"{seq:020d}-{created_at_us:020d}"


def parse_snapshot_id(snapshot_id: str) -> tuple[int, int]:
    """(seq, created_at_us) of a snapshot id; SnapshotCorruptError when malformed.

    Stores use ids in paths and Kafka keys, so only this exact shape is accepted.
    """
    m = _ID_RE.match(snapshot_id)
    if m is None:
        raise SnapshotCorruptError("malformed snapshot id", snapshot=snapshot_id)
    return int(m.group(1)), int(m.group(2))


def is_snapshot_id(value: str) -> bool:
    return _ID_RE.match(value) is not None


# --- chunks -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    """One chunk as the manifest lists it; ``bytes``/``crc32c`` cover the stored frame."""

    index: int
    keys: int
    stored_bytes: int
    crc32c: int
    first_key: bytes = b""

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "keys": self.keys,
            "bytes": self.stored_bytes,
            "crc32c": self.crc32c,
            "first_key": self.first_key.hex(),
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ChunkInfo:
        return cls(
            index=_int(obj, "index"),
            keys=_int(obj, "keys"),
            stored_bytes=_int(obj, "bytes"),
            crc32c=_int(obj, "crc32c"),
            first_key=bytes.fromhex(str(obj.get("first_key", ""))),
        )


def encode_chunk(
    keys: Sequence[bytes],
    values: Sequence[bytes],
    *,
    level: int = 3,
    keyring: Keyring | None = None,
) -> bytes:
    """Frame one chunk of key-sorted pairs; encrypted with ``keyring.current_id`` if set."""
    if len(keys) != len(values):
        raise ValueError("keys and values differ in length")
    body = msgpack.packb([list(keys), list(values)], use_bin_type=True)
    payload = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(body)
    key_id = keyring.current_id if keyring is not None else None
    flags = 0 if key_id is None else CHUNK_FLAG_ENCRYPTED
    stored = len(payload) + (0 if key_id is None else _CRYPTO_OVERHEAD)
    header = _HEADER.pack(
        CHUNK_MAGIC, CHUNK_VERSION, CODEC_ZSTD, flags, len(keys), len(body), stored
    )
    crc = crc32c.crc32c(body, crc32c.crc32c(header))
    head = header + _CRC.pack(crc)
    if keyring is not None and key_id is not None:
        payload = keyring.encrypt(key_id, payload, head)
    return head + payload


def chunk_is_encrypted(frame: bytes) -> bool:
    """True if a (well-formed) frame's payload is encrypted."""
    if len(frame) < CHUNK_HEADER_BYTES:
        return False
    return bool(_HEADER.unpack_from(frame)[3] & CHUNK_FLAG_ENCRYPTED)


def chunk_info(index: int, frame: bytes, keys: Sequence[bytes]) -> ChunkInfo:
    """The manifest entry for a stored frame."""
    return ChunkInfo(
        index=index,
        keys=len(keys),
        stored_bytes=len(frame),
        crc32c=crc32c.crc32c(frame),
        # An encrypted chunk's first key stays out of the plaintext manifest.
        first_key=keys[0] if keys and not chunk_is_encrypted(frame) else b"",
    )


def check_chunk(frame: bytes, info: ChunkInfo, *, snapshot_id: str) -> None:
    """Cheap check of a stored frame against its manifest entry (no decompression)."""
    if len(frame) != info.stored_bytes:
        raise SnapshotCorruptError(
            f"chunk has {len(frame)} bytes, manifest says {info.stored_bytes}",
            snapshot=snapshot_id,
            chunk=info.index,
        )
    crc = crc32c.crc32c(frame)
    if crc != info.crc32c:
        raise SnapshotCorruptError(
            f"chunk CRC32C mismatch (stored {crc:#010x}, manifest {info.crc32c:#010x})",
            snapshot=snapshot_id,
            chunk=info.index,
        )


def decode_chunk(
    frame: bytes,
    *,
    snapshot_id: str,
    index: int,
    info: ChunkInfo | None = None,
    body_bytes_max: int = BODY_BYTES_MAX_DEFAULT,
    keyring: Keyring | None = None,
) -> tuple[list[bytes], list[bytes]]:
    """(keys, values) of one frame, verified; SnapshotCorruptError naming snapshot/chunk.

    An encrypted frame needs ``keyring`` holding its key; otherwise the error
    names the key id ("configure encryption_keys").
    """

    def corrupt(why: str) -> SnapshotCorruptError:
        return SnapshotCorruptError(
            f"corrupt snapshot chunk: {why}", snapshot=snapshot_id, chunk=index
        )

    if info is not None:
        check_chunk(frame, info, snapshot_id=snapshot_id)
    if len(frame) < CHUNK_HEADER_BYTES:
        raise corrupt(f"{len(frame)} bytes is shorter than the {CHUNK_HEADER_BYTES}-byte header")
    magic, version, codec, flags, n_keys, body_len, payload_len = _HEADER.unpack_from(frame)
    if magic != CHUNK_MAGIC:
        raise corrupt(f"bad magic {magic!r}")
    if version != CHUNK_VERSION:
        raise corrupt(f"unknown chunk version {version}")
    if codec != CODEC_ZSTD:
        raise corrupt(f"unknown codec {codec}")
    if flags & ~_CHUNK_KNOWN_FLAGS:
        raise corrupt(f"unknown flags 0x{flags:04x}")
    if payload_len != len(frame) - CHUNK_HEADER_BYTES:
        raise corrupt(f"payload length {payload_len} != {len(frame) - CHUNK_HEADER_BYTES}")
    if body_len > body_bytes_max:
        raise corrupt(f"body of {body_len} bytes exceeds the {body_bytes_max}-byte bound")
    # An entry needs at least 2 bytes per key and per value in msgpack: bounds n_keys.
    if n_keys * 4 > body_len + 4:
        raise corrupt(f"{n_keys} keys cannot fit in {body_len} bytes")
    (expected_crc,) = _CRC.unpack_from(frame, _HEADER.size)
    payload = memoryview(frame)[CHUNK_HEADER_BYTES:]
    if flags & CHUNK_FLAG_ENCRYPTED:
        ring = keyring if keyring is not None else Keyring({})
        view = memoryview(frame)
        try:
            payload = memoryview(
                ring.decrypt(
                    view[CHUNK_HEADER_BYTES:], view[:CHUNK_HEADER_BYTES], what="snapshot chunk"
                )
            )
        except DecodeError as exc:
            raise SnapshotCorruptError(
                exc.message, **exc.context, snapshot=snapshot_id, chunk=index
            ) from None
    try:
        params = zstandard.get_frame_parameters(payload)
        if params.content_size != body_len:
            raise corrupt(f"zstd frame size {params.content_size} != header {body_len}")
        body = zstandard.ZstdDecompressor().decompress(payload, max_output_size=body_len)
    except zstandard.ZstdError as exc:
        raise corrupt(f"zstd: {exc}") from exc
    if len(body) != body_len:
        raise corrupt(f"body is {len(body)} bytes, header says {body_len}")
    crc = crc32c.crc32c(body, crc32c.crc32c(frame[: _HEADER.size]))
    if crc != expected_crc:
        raise corrupt(f"CRC32C mismatch (computed {crc:#010x}, frame {expected_crc:#010x})")
    try:
        obj = msgpack.unpackb(
            body,
            use_list=True,
            raw=False,
            max_bin_len=body_len,
            max_array_len=max(n_keys, 2),
            max_str_len=0,
            max_map_len=0,
            max_ext_len=0,
        )
    except (ValueError, msgpack.UnpackException) as exc:
        raise corrupt(f"msgpack: {exc}") from exc
    if not (isinstance(obj, list) and len(obj) == 2):
        raise corrupt("body is not [keys, values]")
    keys, values = obj
    if not (isinstance(keys, list) and isinstance(values, list)):
        raise corrupt("body is not [keys, values]")
    if len(keys) != n_keys or len(values) != n_keys:
        raise corrupt(f"{len(keys)} keys / {len(values)} values, header says {n_keys}")
    if not all(isinstance(k, bytes) for k in keys) or not all(isinstance(v, bytes) for v in values):
        raise corrupt("keys and values must be binary")
    return keys, values


# --- the manifest -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Manifest:
    """Everything needed to load, verify and continue from one snapshot."""

    snapshot_id: str
    stream_id: str  # hex of the 16-byte stream id ("" when the source had none yet)
    writer_epoch: int | None
    seq: int
    seq_timestamp_us: int  # commit time of the txn at ``seq`` (0 = unknown / empty)
    created_at_us: int
    source: str  # "writer" | "replica"
    topic: str
    partitions: int
    offsets: Mapping[int, int]  # partition -> next offset a reader continues from
    keys: int
    total_bytes: int  # sum of stored chunk frames
    raw_bytes: int  # sum of key + value lengths
    chunks: tuple[ChunkInfo, ...]
    digest: str  # sha256 hex of the state at ``seq`` (ReplicaStore.digest formula)
    format_version: int = FORMAT_VERSION
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def time_upper_bound_us(self) -> int:
        """The commit time of ``seq`` or, when unknown, a safe upper bound of it."""
        return self.seq_timestamp_us or self.created_at_us

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "snapshot_id": self.snapshot_id,
            "stream_id": self.stream_id,
            "writer_epoch": self.writer_epoch,
            "seq": self.seq,
            "seq_timestamp_us": self.seq_timestamp_us,
            "created_at_us": self.created_at_us,
            "source": self.source,
            "topic": self.topic,
            "partitions": self.partitions,
            "offsets": {str(p): o for p, o in sorted(self.offsets.items())},
            "keys": self.keys,
            "total_bytes": self.total_bytes,
            "raw_bytes": self.raw_bytes,
            "digest": {"seq": self.seq, "keys": self.keys, "sha256": self.digest},
            "chunks": [c.to_json() for c in self.chunks],
            "extra": dict(self.extra),
        }

    def validate(self) -> None:
        """Internal consistency; SnapshotCorruptError when the manifest contradicts itself."""

        def bad(why: str) -> SnapshotCorruptError:
            return SnapshotCorruptError(f"invalid manifest: {why}", snapshot=self.snapshot_id)

        if self.format_version != FORMAT_VERSION:
            raise bad(f"unsupported format_version {self.format_version}")
        seq, created = parse_snapshot_id(self.snapshot_id)
        if (seq, created) != (self.seq, self.created_at_us):
            raise bad("snapshot_id does not match seq/created_at_us")
        if [c.index for c in self.chunks] != list(range(len(self.chunks))):
            raise bad("chunk indexes are not 0..n-1")
        if sum(c.keys for c in self.chunks) != self.keys:
            raise bad("chunk key counts do not add up to keys")
        if sum(c.stored_bytes for c in self.chunks) != self.total_bytes:
            raise bad("chunk sizes do not add up to total_bytes")
        if self.partitions < 1 or any(
            not 0 <= p < self.partitions or o < 0 for p, o in self.offsets.items()
        ):
            raise bad("offsets name partitions outside 0..partitions-1")


def encode_manifest(m: Manifest) -> bytes:
    """Canonical JSON with a trailing CRC32C field over the rest (detects truncation)."""
    body = json.dumps(m.to_json(), sort_keys=True, separators=(",", ":"))
    crc = crc32c.crc32c(body.encode())
    return (body[:-1] + f',"manifest_crc32c":{crc}}}').encode()


def decode_manifest(data: bytes, *, where: str = "") -> Manifest:
    """Parse and verify a manifest; SnapshotCorruptError on anything unexpected."""

    def bad(why: str) -> SnapshotCorruptError:
        return SnapshotCorruptError(f"corrupt snapshot manifest: {why}", where=where or "?")

    if len(data) > MANIFEST_BYTES_MAX:
        raise bad(f"{len(data)} bytes exceeds {MANIFEST_BYTES_MAX}")
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"not JSON: {exc}") from exc
    if not isinstance(obj, dict) or "manifest_crc32c" not in obj:
        raise bad("not a manifest object")
    stored_crc = obj.pop("manifest_crc32c")
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    if crc32c.crc32c(canonical) != stored_crc:
        raise bad("manifest CRC32C mismatch")
    try:
        digest = obj["digest"]
        m = Manifest(
            snapshot_id=str(obj["snapshot_id"]),
            stream_id=str(obj["stream_id"]),
            writer_epoch=None if obj["writer_epoch"] is None else int(obj["writer_epoch"]),
            seq=_int(obj, "seq"),
            seq_timestamp_us=_int(obj, "seq_timestamp_us"),
            created_at_us=_int(obj, "created_at_us"),
            source=str(obj["source"]),
            topic=str(obj["topic"]),
            partitions=_int(obj, "partitions"),
            offsets={int(p): int(o) for p, o in dict(obj["offsets"]).items()},
            keys=_int(obj, "keys"),
            total_bytes=_int(obj, "total_bytes"),
            raw_bytes=_int(obj, "raw_bytes"),
            chunks=tuple(ChunkInfo.from_json(c) for c in obj["chunks"]),
            digest=str(digest["sha256"]),
            format_version=_int(obj, "format_version"),
            extra=dict(obj.get("extra", {})),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise bad(f"missing or invalid field: {exc!r}") from exc
    m.validate()
    return m


def _int(obj: Mapping[str, Any], name: str) -> int:
    value = obj[name]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer")
    return value


# --- choosing snapshots (pure) ----------------------------------------------------


def newest_first(manifests: Iterable[Manifest]) -> list[Manifest]:
    return sorted(manifests, key=lambda m: m.snapshot_id, reverse=True)


def missing_partitions(m: Manifest, log_start: Mapping[int, int]) -> dict[int, tuple[int, int]]:
    """Partitions where the log no longer holds what follows the snapshot.

    Returns {partition: (manifest offset, log start offset)} for each partition
    whose log start is beyond the offset a reader would continue from; empty
    when the snapshot connects with the log.
    """
    gaps: dict[int, tuple[int, int]] = {}
    for p in range(m.partitions):
        start = log_start.get(p, 0)
        offset = m.offsets.get(p, 0)
        if offset < start:
            gaps[p] = (offset, start)
    return gaps


def connects(m: Manifest, log_start: Mapping[int, int]) -> bool:
    return not missing_partitions(m, log_start)
