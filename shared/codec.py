"""The wire format: Kafka message key/value <-> Batch, and WAL record payloads.

Pure: bytes in, bytes out, no I/O. docs/wire-format.md is the user-facing spec.

Kafka key   = first_seq as 8-byte big-endian unsigned.
Kafka value = 76-byte header (big-endian) followed by the payload:

    offset size field
    0      4    magic              b"WSHP"
    4      1    version            FORMAT_VERSION (1)
    5      1    flags              bit 0 ENCRYPTED (FLAG_ENCRYPTED); other bits must be 0
    6      1    codec              0 none, 1 zstd, 2 zstd with dictionary
    7      1    reserved           must be 0
    8      8    first_seq          seq of the first entry in this message (>= 1)
    16     8    last_seq           first_seq + entry_count - 1
    24     4    entry_count        >= 1
    28     4    txn_count          >= 1; exactly 1 for a part
    32     4    part_index         0-based; 0 for a whole batch
    36     4    part_count         1 for a whole batch, > 1 for the parts of one transaction
    40     4    uncompressed_bytes length of the msgpack body
    44     4    compressed_bytes   length of the stored payload, always len(value) - 76
                                       (= uncompressed_bytes for codec 0 unencrypted; + 32 encrypted)
    48     4    dict_id            zstd dictionary id for codec 2, else 0
    52     16   stream_id          the writer's stream id
    68     4    epoch              the writer's epoch
    72     4    crc32c             CRC32C (Castagnoli) of bytes 0..71 then the uncompressed body
    76     ...  payload            compressed_bytes bytes: the body, compressed per codec

Encrypted payload (flags bit 0; shared/crypto.py), AES-256-GCM:

    0      4    key_id             u32, which key of the reader's keyring (encryption_keys)
    4      12   nonce              random per message
    16     n+16 sealed             ciphertext of the n-byte compressed payload, then the GCM tag

AAD = the 76-byte header *with* the crc32c field, so every header field is
authenticated. The CRC stays over bytes 0..71 and the uncompressed body.

Body (msgpack, columnar so that decoding is a handful of C calls, not a loop):

    [ops: bin (one byte per entry, 0 put / 1 delete),
     keys: array of bin, values: array of bin (b"" for deletes),
     txn_sizes: array of uint (entries per transaction),
     txn_timestamps_us: array of uint (commit time per transaction)]

A transaction too large for one message becomes parts (same layout, one
transaction, a contiguous slice of its entries). A put whose value alone does not
fit a message is cut into fragments: the part that continues a value starts with
the same seq the previous part ended with (first_seq == previous last_seq).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from itertools import chain
from typing import Any

import crc32c
import msgpack
import zstandard
from walship.shared.codec_dict import ZstdDictionary, train_dictionary
from walship.shared.crypto import OVERHEAD_BYTES as _CRYPTO_OVERHEAD
from walship.shared.crypto import Keyring
from walship.shared.errors import DecodeError
from walship.shared.model import Batch, Op, Transaction, WriterId

__all__ = [
    "FLAG_ENCRYPTED",
    "FORMAT_VERSION",
    "HEADER_BYTES",
    "MAGIC",
    "MESSAGE_BYTES_MAX_DEFAULT",
    "Assembled",
    "Codec",
    "Decoder",
    "EncodedMessage",
    "Encoder",
    "Header",
    "PartAssembler",
    "ZstdDictionary",
    "decode_transaction",
    "encode_transaction",
    "message_key",
    "partition_for",
    "peek_header",
    "train_dictionary",
    "training_samples",
]

MAGIC = b"WSHP"
FORMAT_VERSION = 1
MESSAGE_BYTES_MAX_DEFAULT = 900_000  # stays below Kafka's default 1 MB
FLAG_ENCRYPTED = 0x01  # payload = key_id + nonce + AES-256-GCM(payload) (shared/crypto.py)
KNOWN_FLAGS = FLAG_ENCRYPTED  # unknown flags are refused, never ignored

_HEADER = struct.Struct(">4sBBBBQQIIIIIII16sII")
HEADER_BYTES = _HEADER.size  # 76
_CRC_OFFSET = HEADER_BYTES - 4
_U32_MAX = 2**32 - 1
_SEQ_MAX = 2**63 - 1  # replicas store seqs and timestamps in SQLite's signed 64-bit integers

# Upper bound of the msgpack bytes a body needs besides its entries and
# transactions: the outer array, the ops bin header and four array headers.
_BODY_FIXED_BYTES = 1 + 5 + 4 * 5
# Per transaction: one txn_sizes uint and one timestamp uint (9 bytes each at most).
_TXN_BYTES = 18
# Smallest message that can carry one entry with a small key and a value fragment.
_MESSAGE_BYTES_MIN = HEADER_BYTES + 256

_WAL_RECORD_VERSION = 1
_TRACEPARENT_BYTES_MAX = 512


class Codec(IntEnum):
    NONE = 0
    ZSTD = 1
    ZSTD_DICT = 2


def message_key(first_seq: int) -> bytes:
    """The Kafka message key: ``first_seq`` as 8-byte big-endian."""
    if not 0 <= first_seq < 2**64:
        raise ValueError(f"first_seq out of range: {first_seq}")
    return first_seq.to_bytes(8, "big")


_M64 = 2**64 - 1


def partition_for(first_seq: int, partitions: int) -> int:
    """The partition of a message routed by ``first_seq`` (its routing_seq).

    splitmix64's finalizer mixes the seq, then ``% partitions``. Plain
    ``seq % partitions`` would not do: with 10-entry transactions the first seqs
    1, 11, 21, ... would only ever reach the partitions of one residue class
    (P=6: 1, 5, 3). Any language reproduces this with 64-bit unsigned arithmetic.
    """
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    if not 0 <= first_seq < 2**64:
        raise ValueError(f"first_seq out of range: {first_seq}")
    z = (first_seq + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    z ^= z >> 31
    return z % partitions


@dataclass(frozen=True, slots=True)
class Header:
    """The fixed header of a message, parsed and checked by ``peek_header``."""

    version: int
    flags: int
    codec: Codec
    first_seq: int
    last_seq: int
    entry_count: int
    txn_count: int
    part_index: int
    part_count: int
    uncompressed_bytes: int
    compressed_bytes: int
    dict_id: int
    writer: WriterId
    crc32c: int

    @property
    def is_part(self) -> bool:
        return self.part_count > 1

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & FLAG_ENCRYPTED)


@dataclass(frozen=True, slots=True)
class EncodedMessage:
    """One Kafka message. ``len(value)`` is its size on the wire."""

    key: bytes
    value: bytes
    first_seq: int
    last_seq: int
    entry_count: int
    body_bytes: int  # uncompressed msgpack body
    routing_seq: int  # feed to partition_for: the txn's first seq for every part of a split txn


# --------------------------------------------------------------------------- encoding


def _bin_header_bytes(length: int) -> int:
    """msgpack bin8/bin16/bin32 header size for a payload of ``length`` bytes."""
    if length < 256:
        return 2
    return 3 if length < 65536 else 5


def _column_bytes(items: Sequence[bytes]) -> int:
    """Upper bound of the msgpack size of one column's bin items (without the array header)."""
    if not items:
        return 0
    # Two C-level passes; the widest item decides the (upper bound) header size.
    return sum(map(len, items)) + len(items) * _bin_header_bytes(max(map(len, items)))


def _check_transaction(txn: Transaction, expected_seq: int | None) -> None:
    """Refuse, at the source, what a decoder would refuse (programmer errors)."""
    n = len(txn.keys)
    if n == 0:
        raise ValueError(f"transaction at seq {txn.first_seq} is empty")
    if len(txn.values) != n or len(txn.ops) != n:
        raise ValueError(f"transaction at seq {txn.first_seq}: ops/keys/values lengths differ")
    if expected_seq is not None and txn.first_seq != expected_seq:
        raise ValueError(
            f"transactions not dense: expected seq {expected_seq}, got {txn.first_seq}"
        )
    if txn.first_seq < 1 or txn.last_seq > _SEQ_MAX:
        raise ValueError(f"transaction seqs out of range: {txn.first_seq}..{txn.last_seq}")
    if not 0 <= txn.timestamp_us <= _SEQ_MAX:
        raise ValueError(f"timestamp_us out of range: {txn.timestamp_us}")
    ops = bytes(txn.ops)
    if ops.translate(None, b"\x00\x01"):
        raise ValueError(f"transaction at seq {txn.first_seq}: ops must be 0 (put) or 1 (delete)")
    i = ops.find(b"\x01")
    while i >= 0:
        if txn.values[i]:
            raise ValueError(f"delete at seq {txn.first_seq + i} carries a value")
        i = ops.find(b"\x01", i + 1)


def _txn_body_bytes(txn: Transaction) -> int:
    """Upper bound of what ``txn`` adds to a body."""
    return len(txn.ops) + _column_bytes(txn.keys) + _column_bytes(txn.values) + _TXN_BYTES


@dataclass(slots=True)
class _Slice:
    """The columns of one message being built."""

    first_seq: int
    ops: bytearray
    keys: list[bytes]
    values: list[bytes]
    txn_sizes: list[int]
    txn_timestamps_us: list[int]


class Encoder:
    """Turns dense transactions into Kafka messages (not thread-safe: one per publisher).

    Messages are packed greedily by *uncompressed* size: a body never exceeds
    ``message_bytes_max - HEADER_BYTES``, and the payload is stored uncompressed
    (codec 0) whenever zstd would not shrink it, so every message fits even when
    its data is incompressible.
    """

    def __init__(
        self,
        writer: WriterId,
        *,
        message_bytes_max: int = MESSAGE_BYTES_MAX_DEFAULT,
        level: int = 3,
        dictionary: ZstdDictionary | None = None,
        keyring: Keyring | None = None,
    ) -> None:
        """``keyring``: payloads are encrypted with its ``current_id`` key when it has one
        (a keyring without a current id encrypts nothing)."""
        if not _MESSAGE_BYTES_MIN <= message_bytes_max <= _U32_MAX:
            raise ValueError(
                f"message_bytes_max must be in {_MESSAGE_BYTES_MIN}..{_U32_MAX}, "
                f"got {message_bytes_max}"
            )
        self._writer = writer
        self._message_bytes_max = message_bytes_max
        self._keyring = keyring
        self._key_id = keyring.current_id if keyring is not None else None
        # Encryption adds a fixed overhead; the body budget shrinks by it so messages still fit.
        overhead = _CRYPTO_OVERHEAD if self._key_id is not None else 0
        self._body_bytes_max = message_bytes_max - HEADER_BYTES - overhead
        self._dictionary = dictionary
        # Content size in the frame lets readers refuse bombs before allocating;
        # no zstd checksum and no dict id in the frame: the header carries both.
        try:
            self._cctx = zstandard.ZstdCompressor(
                level=level,
                dict_data=dictionary.zstd_dict() if dictionary else None,
                write_content_size=True,
                write_checksum=False,
                write_dict_id=False,
            )
        except zstandard.ZstdError as exc:
            raise ValueError(f"cannot set up zstd compression (level {level}): {exc}") from exc
        self._packer = msgpack.Packer(use_bin_type=True, autoreset=True)

    @property
    def writer(self) -> WriterId:
        return self._writer

    @property
    def message_bytes_max(self) -> int:
        return self._message_bytes_max

    def encode(
        self, txns: Sequence[Transaction], traceparent: str | None = None
    ) -> list[EncodedMessage]:
        """Encode dense whole transactions into messages, in seq order.

        ``traceparent`` is not written into the value: the publisher puts trace
        context in Kafka headers, where tracing tools expect it.
        """
        del traceparent
        out: list[EncodedMessage] = []
        group: list[Transaction] = []
        group_bytes = _BODY_FIXED_BYTES
        expected: int | None = None
        for txn in txns:
            _check_transaction(txn, expected)
            expected = txn.last_seq + 1
            size = _txn_body_bytes(txn)
            if group and group_bytes + size > self._body_bytes_max:
                out.append(self._whole(group))
                group, group_bytes = [], _BODY_FIXED_BYTES
            if _BODY_FIXED_BYTES + size > self._body_bytes_max:
                out.extend(self._parts(txn))
            else:
                group.append(txn)
                group_bytes += size
        if group:
            out.append(self._whole(group))
        return out

    def _whole(self, group: list[Transaction]) -> EncodedMessage:
        s = _Slice(
            first_seq=group[0].first_seq,
            ops=bytearray().join(t.ops for t in group),
            keys=list(chain.from_iterable(t.keys for t in group)),
            values=list(chain.from_iterable(t.values for t in group)),
            txn_sizes=[len(t.keys) for t in group],
            txn_timestamps_us=[t.timestamp_us for t in group],
        )
        return self._message(s, routing_seq=s.first_seq, part_index=0, part_count=1)

    def _parts(self, txn: Transaction) -> list[EncodedMessage]:
        """Cut one transaction into ordered parts, each a contiguous slice of entries."""
        budget = self._body_bytes_max - _BODY_FIXED_BYTES - _TXN_BYTES
        ts = txn.timestamp_us
        slices: list[_Slice] = []

        def new_slice(seq: int) -> _Slice:
            s = _Slice(seq, bytearray(), [], [], [0], [ts])
            slices.append(s)
            return s

        cur = new_slice(txn.first_seq)
        used = 0
        for i, (op, key, value) in enumerate(zip(txn.ops, txn.keys, txn.values, strict=True)):
            seq = txn.first_seq + i
            head = 1 + len(key) + _bin_header_bytes(len(key))
            cost = head + len(value) + _bin_header_bytes(len(value))
            if used + cost > budget and cur.keys and cost <= budget:
                cur, used = new_slice(seq), 0
            if used + cost <= budget:
                cur.ops.append(op)
                cur.keys.append(key)
                cur.values.append(value)
                used += cost
                continue
            # A put larger than a whole message: cut its value into fragments.
            head += 5  # worst-case bin header of a fragment
            if head + 1 > budget:
                raise ValueError(
                    f"key of {len(key)} bytes at seq {seq} cannot fit a message of "
                    f"{self._message_bytes_max} bytes"
                )
            offset = 0
            while offset < len(value):
                room = budget - used - head
                if room <= 0:
                    cur, used = new_slice(seq), 0
                    continue
                fragment = value[offset : offset + room]
                cur.ops.append(op)
                cur.keys.append(key)
                cur.values.append(fragment)
                used += head + len(fragment)
                offset += len(fragment)
                if offset < len(value):
                    cur, used = new_slice(seq), 0
        for s in slices:
            s.txn_sizes[0] = len(s.keys)
        count = len(slices)
        if count == 1:  # the size estimate was pessimistic: it fits, keep it whole
            return [self._message(slices[0], slices[0].first_seq, 0, 1)]
        return [self._message(s, txn.first_seq, i, count) for i, s in enumerate(slices)]

    def _message(
        self, s: _Slice, routing_seq: int, part_index: int, part_count: int
    ) -> EncodedMessage:
        body = self._packer.pack([bytes(s.ops), s.keys, s.values, s.txn_sizes, s.txn_timestamps_us])
        payload = self._cctx.compress(body)
        codec, dict_id = Codec.ZSTD, 0
        if self._dictionary is not None:
            codec, dict_id = Codec.ZSTD_DICT, self._dictionary.dict_id
        if len(payload) >= len(body):  # incompressible: store as is, so it always fits
            payload, codec, dict_id = body, Codec.NONE, 0
        entry_count = len(s.keys)
        last_seq = s.first_seq + entry_count - 1
        encrypted = self._key_id is not None
        header = bytearray(
            _HEADER.pack(
                MAGIC,
                FORMAT_VERSION,
                FLAG_ENCRYPTED if encrypted else 0,
                codec,
                0,
                s.first_seq,
                last_seq,
                entry_count,
                len(s.txn_sizes),
                part_index,
                part_count,
                len(body),
                len(payload) + (_CRYPTO_OVERHEAD if encrypted else 0),
                dict_id,
                self._writer.stream_id,
                self._writer.epoch,
                0,
            )
        )
        crc = crc32c.crc32c(body, crc32c.crc32c(memoryview(header)[:_CRC_OFFSET]))
        header[_CRC_OFFSET:] = crc.to_bytes(4, "big")
        if self._keyring is not None and self._key_id is not None:
            # The whole header, crc included, is the AAD: header fields are authenticated.
            payload = self._keyring.encrypt(self._key_id, payload, bytes(header))
        return EncodedMessage(
            key=message_key(s.first_seq),
            value=bytes(header) + payload,
            first_seq=s.first_seq,
            last_seq=last_seq,
            entry_count=entry_count,
            body_bytes=len(body),
            routing_seq=routing_seq,
        )


def training_samples(txns: Sequence[Transaction]) -> list[bytes]:
    """The message body of each transaction on its own: samples for train_dictionary.

    These are exactly the bytes zstd sees for one-transaction messages, the case
    a dictionary helps most.
    """
    packer = msgpack.Packer(use_bin_type=True, autoreset=True)
    return [
        packer.pack([bytes(t.ops), list(t.keys), list(t.values), [len(t.keys)], [t.timestamp_us]])
        for t in txns
    ]


# --------------------------------------------------------------------------- decoding


def peek_header(value: bytes) -> Header:
    """Parse and check the header of a message (cheap: does not touch the payload)."""
    _check_is_bytes(value)
    return _parse_header(value, len(value))


def _check_is_bytes(value: object) -> None:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise DecodeError(f"message value must be bytes, got {type(value).__name__}")


def _parse_header(value: bytes | bytearray | memoryview, size: int) -> Header:
    if size < HEADER_BYTES:
        raise DecodeError(f"message of {size} bytes is shorter than the {HEADER_BYTES}-byte header")
    (
        magic,
        version,
        flags,
        codec,
        reserved,
        first_seq,
        last_seq,
        entry_count,
        txn_count,
        part_index,
        part_count,
        uncompressed,
        compressed,
        dict_id,
        stream_id,
        epoch,
        crc,
    ) = _HEADER.unpack_from(value)
    if magic != MAGIC:
        raise DecodeError(f"bad magic {magic!r}: not a walship message", expected=MAGIC)
    if version != FORMAT_VERSION:
        raise DecodeError(f"unknown format version {version}", supported=FORMAT_VERSION)
    if flags & ~KNOWN_FLAGS:
        raise DecodeError(f"unknown flags 0x{flags:02x}", first_seq=first_seq)
    if reserved:
        raise DecodeError(f"reserved header byte is {reserved}, not 0", first_seq=first_seq)
    if codec not in _CODECS:
        raise DecodeError(f"unknown codec {codec}", first_seq=first_seq)
    if not 1 <= first_seq <= _SEQ_MAX:
        raise DecodeError(f"first_seq {first_seq} out of range")
    if entry_count < 1 or last_seq != first_seq + entry_count - 1 or last_seq > _SEQ_MAX:
        raise DecodeError(
            f"seq range {first_seq}..{last_seq} does not match entry_count {entry_count}",
            first_seq=first_seq,
        )
    if not 1 <= txn_count <= entry_count:
        raise DecodeError(
            f"txn_count {txn_count} not in 1..entry_count ({entry_count})", first_seq=first_seq
        )
    if part_count < 1 or part_index >= part_count:
        raise DecodeError(
            f"part {part_index} of {part_count} is not a valid part", first_seq=first_seq
        )
    if part_count > 1 and txn_count != 1:
        raise DecodeError(
            f"a part must hold one transaction, header says {txn_count}", first_seq=first_seq
        )
    if compressed != size - HEADER_BYTES:
        raise DecodeError(
            f"header says {compressed} payload bytes, message has {size - HEADER_BYTES}",
            first_seq=first_seq,
        )
    stored = compressed
    if flags & FLAG_ENCRYPTED:
        stored -= _CRYPTO_OVERHEAD
        if stored < 0:
            raise DecodeError(
                f"encrypted payload of {compressed} bytes is shorter than the "
                f"{_CRYPTO_OVERHEAD}-byte encryption overhead",
                first_seq=first_seq,
            )
    if codec == Codec.NONE and uncompressed != stored:
        raise DecodeError(
            f"uncompressed message with lengths {uncompressed} != {stored}",
            first_seq=first_seq,
        )
    # Every entry takes at least 3 body bytes (op, key header, value header).
    if entry_count * 3 > uncompressed:
        raise DecodeError(
            f"{entry_count} entries cannot fit a {uncompressed}-byte body", first_seq=first_seq
        )
    if (dict_id != 0) != (codec == Codec.ZSTD_DICT):
        raise DecodeError(f"dict_id {dict_id} with codec {codec}", first_seq=first_seq)
    return Header(
        version=version,
        flags=flags,
        codec=Codec(codec),
        first_seq=first_seq,
        last_seq=last_seq,
        entry_count=entry_count,
        txn_count=txn_count,
        part_index=part_index,
        part_count=part_count,
        uncompressed_bytes=uncompressed,
        compressed_bytes=compressed,
        dict_id=dict_id,
        writer=WriterId(stream_id=stream_id, epoch=epoch),
        crc32c=crc,
    )


_CODECS = frozenset(int(c) for c in Codec)


def _unpack(data: bytes | memoryview, limit: int, *, max_str_len: int, what: str) -> Any:
    """msgpack.unpackb with every length capped, translating its errors."""
    try:
        return msgpack.unpackb(
            data,
            raw=True,
            use_list=True,  # lists, like the model builds: decoded batches compare equal
            strict_map_key=True,
            max_bin_len=limit,
            max_str_len=max_str_len,
            max_array_len=limit,
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises a zoo of types on malformed input
        raise DecodeError(f"{what} is not valid msgpack: {exc}") from exc


def _check_columns(
    ops: object, keys: object, values: object, entry_count: int, first_seq: int, what: str
) -> None:
    """Shape checks of the entry columns, all C-level passes (no per-entry Python)."""
    if type(ops) is not bytes or type(keys) is not list or type(values) is not list:
        raise DecodeError(f"{what}: ops/keys/values have the wrong types", first_seq=first_seq)
    if not len(ops) == len(keys) == len(values) == entry_count:
        raise DecodeError(
            f"{what}: column lengths {len(ops)}/{len(keys)}/{len(values)} != {entry_count} entries",
            first_seq=first_seq,
        )
    if ops.translate(None, b"\x00\x01"):
        raise DecodeError(f"{what}: an op is neither 0 (put) nor 1 (delete)", first_seq=first_seq)
    try:
        # join refuses anything that is not bytes-like (ints, arrays, None) in C.
        b"".join(keys)
        b"".join(values)
    except TypeError as exc:
        raise DecodeError(f"{what}: a key or value is not binary", first_seq=first_seq) from exc
    i = ops.find(b"\x01")
    while i >= 0:
        if values[i]:
            raise DecodeError(f"{what}: delete carries a value", seq=first_seq + i)
        i = ops.find(b"\x01", i + 1)


def _check_uints(items: object, count: int, low: int, name: str, first_seq: int) -> None:
    if type(items) is not list or len(items) != count:
        raise DecodeError(f"{name} must be an array of {count} integers", first_seq=first_seq)
    if set(map(type, items)) != {int}:
        raise DecodeError(f"{name} holds something other than integers", first_seq=first_seq)
    if min(items) < low or max(items) > _SEQ_MAX:
        raise DecodeError(f"{name} out of range {low}..{_SEQ_MAX}", first_seq=first_seq)


class Decoder:
    """Message value -> Batch, for untrusted bytes: only DecodeError escapes.

    Sizes are checked before anything is allocated: the message against
    ``message_bytes_max``, the declared body against ``body_bytes_max``, the
    zstd frame's declared content size against the header, and the actual output.
    """

    def __init__(
        self,
        *,
        dictionaries: Mapping[int, ZstdDictionary] | None = None,
        message_bytes_max: int = 16 * MESSAGE_BYTES_MAX_DEFAULT,
        body_bytes_max: int = 64 << 20,
        keyring: Keyring | None = None,
    ) -> None:
        """``keyring``: the keys encrypted messages may name (old and new during a
        rotation); without one, an encrypted message is refused naming its key id."""
        if message_bytes_max < HEADER_BYTES or body_bytes_max < 1:
            raise ValueError("message_bytes_max and body_bytes_max must be positive sizes")
        self._keyring = keyring if keyring is not None else Keyring({})
        self._message_bytes_max = message_bytes_max
        self._body_bytes_max = body_bytes_max
        self._dctx = zstandard.ZstdDecompressor()
        self._dict_dctx: dict[int, zstandard.ZstdDecompressor] = {}
        for dict_id, d in (dictionaries or {}).items():
            if dict_id != d.dict_id:
                raise ValueError(f"dictionary registered as {dict_id} has id {d.dict_id}")
            self.add_dictionary(d)

    def add_dictionary(self, d: ZstdDictionary) -> None:
        try:
            self._dict_dctx[d.dict_id] = zstandard.ZstdDecompressor(dict_data=d.zstd_dict())
        except zstandard.ZstdError as exc:
            raise ValueError(f"dictionary {d.dict_id} is not usable: {exc}") from exc

    @property
    def dictionary_ids(self) -> frozenset[int]:
        return frozenset(self._dict_dctx)

    def decode(self, value: bytes) -> Batch:
        _check_is_bytes(value)
        size = len(value)
        if size > self._message_bytes_max:
            raise DecodeError(
                f"message of {size} bytes exceeds message_bytes_max {self._message_bytes_max}"
            )
        h = _parse_header(value, size)
        if h.uncompressed_bytes > self._body_bytes_max:
            raise DecodeError(
                f"declared body of {h.uncompressed_bytes} bytes exceeds body_bytes_max "
                f"{self._body_bytes_max}",
                first_seq=h.first_seq,
            )
        payload = memoryview(value)[HEADER_BYTES:]
        if h.encrypted:
            payload = memoryview(self._decrypt(value, h))
        body = payload if h.codec == Codec.NONE else self._decompress(payload, h)
        crc = crc32c.crc32c(body, crc32c.crc32c(memoryview(value)[:_CRC_OFFSET]))
        if crc != h.crc32c:
            raise DecodeError(
                f"CRC32C mismatch: header {h.crc32c:#010x}, computed {crc:#010x}",
                first_seq=h.first_seq,
            )
        obj = _unpack(body, h.uncompressed_bytes, max_str_len=0, what="message body")
        if type(obj) is not list or len(obj) != 5:
            raise DecodeError("message body is not a 5-element array", first_seq=h.first_seq)
        ops, keys, values, txn_sizes, txn_timestamps_us = obj
        _check_columns(ops, keys, values, h.entry_count, h.first_seq, "message body")
        _check_uints(txn_sizes, h.txn_count, 1, "txn_sizes", h.first_seq)
        _check_uints(txn_timestamps_us, h.txn_count, 0, "txn_timestamps_us", h.first_seq)
        if sum(txn_sizes) != h.entry_count:
            raise DecodeError(
                f"txn_sizes add up to {sum(txn_sizes)}, header says {h.entry_count} entries",
                first_seq=h.first_seq,
            )
        return Batch(
            writer=h.writer,
            first_seq=h.first_seq,
            ops=ops,
            keys=keys,
            values=values,
            txn_sizes=txn_sizes,
            txn_timestamps_us=txn_timestamps_us,
            part_index=h.part_index,
            part_count=h.part_count,
        )

    def _decrypt(self, value: bytes, h: Header) -> bytes:
        view = memoryview(value)
        try:
            return self._keyring.decrypt(view[HEADER_BYTES:], view[:HEADER_BYTES], what="message")
        except DecodeError as exc:
            raise DecodeError(exc.message, **exc.context, first_seq=h.first_seq) from None

    def _decompress(self, payload: memoryview, h: Header) -> bytes:
        if h.codec == Codec.ZSTD_DICT:
            dctx = self._dict_dctx.get(h.dict_id)
            if dctx is None:
                raise DecodeError(
                    f"unknown zstd dictionary id {h.dict_id}",
                    dict_id=h.dict_id,
                    first_seq=h.first_seq,
                    known=sorted(self._dict_dctx),
                )
        else:
            dctx = self._dctx
        try:
            # zstandard trusts the frame's content size over max_output_size, so
            # the declared size is checked first (no allocation for a bomb).
            declared = zstandard.frame_content_size(payload)
            if declared != h.uncompressed_bytes:
                raise DecodeError(
                    f"zstd frame declares {declared} bytes, header says {h.uncompressed_bytes}",
                    first_seq=h.first_seq,
                )
            body: bytes = dctx.decompress(
                payload, max_output_size=h.uncompressed_bytes, allow_extra_data=False
            )
        except zstandard.ZstdError as exc:
            raise DecodeError(f"zstd payload is corrupt: {exc}", first_seq=h.first_seq) from exc
        if len(body) != h.uncompressed_bytes:
            raise DecodeError(
                f"payload decompressed to {len(body)} bytes, header says {h.uncompressed_bytes}",
                first_seq=h.first_seq,
            )
        return body


# --------------------------------------------------------------------------- parts


@dataclass(frozen=True, slots=True)
class Assembled:
    """A whole batch out of :meth:`PartAssembler.add` and the offset of its first message
    (its first part's offset when it was reassembled from parts)."""

    batch: Batch
    first_offset: int


@dataclass(slots=True)
class _Assembly:
    parts: list[Batch]
    first_offset: int
    nbytes: int


class PartAssembler:
    """Reassembles the parts of split transactions; one per partition, fed in offset order.

    Whole batches pass through. Assemblies are kept per writer (stream and
    epoch): a message from another writer never destroys one in progress. A
    second writer's batch landing between the parts of a split transaction
    must leave that transaction complete, so the reader's merger sees both and
    reports the split brain (dropping the parts instead made the transaction
    unrecoverable from this partition, and the reader waited for it forever).

    For one writer, a publisher sends a transaction's parts back to back on one
    partition, so anything else from the same writer ends the assembly: a part 0
    starts it again (a publisher resending after a crash), a whole batch
    abandons it, and a part that does not continue it is dropped with it (the
    reader's sequence merge then sees the gap and waits or re-fetches).

    An assembly of an older epoch whose publisher died mid-transaction is never
    continued; the new epoch resends the transaction, and
    :meth:`discard_through` drops the leftover once the replica applied it.
    While parts are held, :attr:`first_offset` is the offset a reader must not
    commit past: those messages are still needed.
    """

    def __init__(self, *, txn_bytes_max: int = 1 << 30) -> None:
        self._txn_bytes_max = txn_bytes_max
        self._assemblies: dict[WriterId, _Assembly] = {}

    @property
    def pending(self) -> bool:
        """True while a transaction is partly assembled."""
        return bool(self._assemblies)

    @property
    def first_offset(self) -> int | None:
        """Offset of the earliest part held (None when nothing is held)."""
        return min((a.first_offset for a in self._assemblies.values()), default=None)

    @property
    def first_seq(self) -> int | None:
        """First sequence of the earliest transaction held (None when nothing is held)."""
        return min((a.parts[0].first_seq for a in self._assemblies.values()), default=None)

    def reset(self) -> None:
        self._assemblies = {}

    def discard_through(self, seq: int) -> bool:
        """Drop assemblies of transactions starting at or before ``seq`` (already applied:
        their parts could only repeat what the replica holds). True if any was dropped."""
        stale = [w for w, a in self._assemblies.items() if a.parts[0].first_seq <= seq]
        for w in stale:
            del self._assemblies[w]
        return bool(stale)

    def feed(self, batch: Batch) -> Batch | None:
        """:meth:`add` without offsets: the whole batch, or None while parts are missing."""
        out = self.add(batch, -1)
        return out.batch if out is not None else None

    def add(self, batch: Batch, offset: int) -> Assembled | None:
        """Feed the message read at ``offset``; a whole batch when one is complete."""
        writer = batch.writer
        if not batch.is_part:
            self._assemblies.pop(writer, None)
            return Assembled(batch, offset)
        current = self._assemblies.get(writer)
        if batch.part_index == 0:
            current = _Assembly([], offset, 0)
            self._assemblies[writer] = current
        elif current is None or not _continues(current.parts[-1], batch):
            self._assemblies.pop(writer, None)
            return None
        current.nbytes += sum(map(len, batch.values)) + sum(map(len, batch.keys))
        held = sum(a.nbytes for a in self._assemblies.values())
        if held > self._txn_bytes_max:
            first = current.parts[0].first_seq if current.parts else batch.first_seq
            self.reset()
            raise DecodeError(
                f"transaction split in parts exceeds txn_bytes_max {self._txn_bytes_max}",
                first_seq=first,
            )
        current.parts.append(batch)
        if batch.part_index + 1 < batch.part_count:
            return None
        del self._assemblies[writer]
        return Assembled(_join(current.parts), current.first_offset)


def _continues(prev: Batch, nxt: Batch) -> bool:
    if (
        nxt.part_index != prev.part_index + 1
        or nxt.part_count != prev.part_count
        or nxt.writer != prev.writer
        or nxt.txn_timestamps_us[0] != prev.txn_timestamps_us[0]
    ):
        return False
    if nxt.first_seq == prev.last_seq + 1:
        return True
    # A value fragment: the same put, continued.
    return (
        nxt.first_seq == prev.last_seq
        and prev.ops[-1] == nxt.ops[0] == Op.PUT
        and prev.keys[-1] == nxt.keys[0]
    )


def _join(parts: list[Batch]) -> Batch:
    ops = bytearray()
    keys: list[bytes] = []
    values: list[bytes] = []
    # Fragments of a value cut across parts, joined once (no quadratic copying).
    tail: list[bytes] = []
    last_seq = parts[0].first_seq - 1
    for p in parts:
        start = 0
        if p.first_seq == last_seq:  # p starts by continuing the previous part's last value
            if not tail:
                tail = [values[-1]]
            tail.append(p.values[0])
            start = 1
        if tail and start < len(p.keys):  # the continued value is complete
            values[-1] = b"".join(tail)
            tail = []
        ops += p.ops[start:]
        keys.extend(p.keys[start:])
        values.extend(p.values[start:])
        last_seq = p.last_seq
    if tail:
        values[-1] = b"".join(tail)
    first = parts[0]
    return Batch(
        writer=first.writer,
        first_seq=first.first_seq,
        ops=bytes(ops),
        keys=keys,
        values=values,
        txn_sizes=[len(keys)],
        txn_timestamps_us=[first.txn_timestamps_us[0]],
        traceparent=first.traceparent,
    )


# --------------------------------------------------------------------------- WAL records


def encode_transaction(txn: Transaction, traceparent: str | None = None) -> bytes:
    """The WAL record payload of one transaction (uncompressed msgpack, no CRC).

    ``[1, first_seq, timestamp_us, ops, keys, values, traceparent or nil]``.
    """
    _check_transaction(txn, None)
    if traceparent is not None and (
        not traceparent.isascii() or len(traceparent) > _TRACEPARENT_BYTES_MAX
    ):
        raise ValueError(f"traceparent must be ASCII, <= {_TRACEPARENT_BYTES_MAX} characters")
    return msgpack.packb(
        [
            _WAL_RECORD_VERSION,
            txn.first_seq,
            txn.timestamp_us,
            bytes(txn.ops),
            list(txn.keys),
            list(txn.values),
            traceparent,
        ],
        use_bin_type=True,
    )


def decode_transaction(data: bytes) -> tuple[Transaction, str | None]:
    """Inverse of encode_transaction, for untrusted bytes: only DecodeError escapes."""
    _check_is_bytes(data)
    obj = _unpack(data, len(data), max_str_len=_TRACEPARENT_BYTES_MAX, what="WAL record")
    if type(obj) is not list or len(obj) != 7:
        raise DecodeError("WAL record is not a 7-element array")
    version, first_seq, timestamp_us, ops, keys, values, traceparent = obj
    if version != _WAL_RECORD_VERSION or type(version) is not int:
        raise DecodeError(f"unknown WAL record version {version!r}")
    if type(first_seq) is not int or type(timestamp_us) is not int:
        raise DecodeError("WAL record first_seq/timestamp_us are not integers")
    if not 1 <= first_seq <= _SEQ_MAX or not 0 <= timestamp_us <= _SEQ_MAX:
        raise DecodeError(
            f"WAL record seq {first_seq} or timestamp {timestamp_us} out of range",
            first_seq=first_seq,
        )
    if type(keys) is not list:
        raise DecodeError("WAL record keys are not an array", first_seq=first_seq)
    count = len(keys)
    if count < 1 or first_seq + count - 1 > _SEQ_MAX:
        raise DecodeError(f"WAL record holds {count} entries", first_seq=first_seq)
    _check_columns(ops, keys, values, count, first_seq, "WAL record")
    tp: str | None = None
    if traceparent is not None:
        if type(traceparent) is not bytes or not traceparent.isascii():
            raise DecodeError("WAL record traceparent is not an ASCII string", first_seq=first_seq)
        tp = traceparent.decode("ascii")
    txn = Transaction(
        first_seq=first_seq, ops=ops, keys=keys, values=values, timestamp_us=timestamp_us
    )
    return txn, tp
