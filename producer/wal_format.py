"""The WAL's on-disk format, as pure functions over bytes (no I/O).

Segment file ``<first_seq:020d>.seg`` = 8-byte header then records::

    header  magic b"WSWL" | u16 version (1) | u16 flags (0)
    record  u32 length | u32 crc32c | u64 first_seq | u32 entry_count | payload

Big-endian. ``length`` counts the bytes after the crc field (12 + payload);
the crc32c covers exactly those bytes. ``payload`` is
``codec.encode_transaction``: one transaction per record.

``scan`` decides what a damaged record means: damage with nothing valid after it
is a torn tail (a write cut short); damage followed by a valid record is
corruption in the middle of the log, which must never be dropped silently.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

import crc32c

SEGMENT_MAGIC = b"WSWL"
SEGMENT_VERSION = 1
SEGMENT_HEADER = struct.Struct(">4sHH")
SEGMENT_HEADER_BYTES = SEGMENT_HEADER.size  # 8
RECORD_HEADER = struct.Struct(">IIQI")
RECORD_HEADER_BYTES = RECORD_HEADER.size  # 20
_AFTER_CRC = 12  # first_seq + entry_count
RECORD_BYTES_MAX = 1 << 30  # a length above this is damage, not data
SEQ_MAX = 2**63 - 1
_SEGMENT_NAME = re.compile(r"^(\d{20})\.seg$")
# When a record is damaged, how many following sequences to look for a valid
# record at (besides the one the damaged record's own header points to).
RESYNC_SEQS = 16


def segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}.seg"


def parse_segment_name(name: str) -> int | None:
    m = _SEGMENT_NAME.match(name)
    return int(m.group(1)) if m else None


def segment_header() -> bytes:
    return SEGMENT_HEADER.pack(SEGMENT_MAGIC, SEGMENT_VERSION, 0)


def check_segment_header(data: bytes) -> str | None:
    """None when ``data`` starts with a valid header, else what is wrong."""
    if len(data) < SEGMENT_HEADER_BYTES:
        return f"segment header is short ({len(data)} bytes)"
    magic, version, _flags = SEGMENT_HEADER.unpack_from(data)
    if magic != SEGMENT_MAGIC:
        return f"bad segment magic {magic!r}"
    if version != SEGMENT_VERSION:
        return f"unsupported segment version {version}"
    return None


def encode_record(first_seq: int, entry_count: int, payload: bytes) -> bytes:
    body = struct.pack(">QI", first_seq, entry_count) + payload
    return struct.pack(">II", len(body), crc32c.crc32c(body)) + body


@dataclass(frozen=True, slots=True)
class Record:
    offset: int
    size: int  # whole record, header included
    first_seq: int
    entry_count: int
    payload: bytes

    @property
    def last_seq(self) -> int:
        return self.first_seq + self.entry_count - 1

    @property
    def end(self) -> int:
        return self.offset + self.size


def parse_record(buf: bytes | memoryview, offset: int) -> tuple[Record | None, str]:
    """The record at ``offset``, or (None, why not): "short" when the bytes end
    inside it (a tail being written or torn), otherwise the damage found."""
    avail = len(buf) - offset
    if avail < RECORD_HEADER_BYTES:
        return None, "short"
    length, crc, first_seq, count = RECORD_HEADER.unpack_from(buf, offset)
    if length <= _AFTER_CRC or length > RECORD_BYTES_MAX:
        return None, f"bad record length {length}"
    if avail < 8 + length:
        return None, "short"
    body = bytes(buf[offset + 8 : offset + 8 + length])
    if crc32c.crc32c(body) != crc:
        return None, "checksum mismatch"
    if count < 1 or first_seq < 1 or first_seq + count - 1 > SEQ_MAX:
        return None, f"bad record seqs {first_seq}+{count}"
    return Record(offset, 8 + length, first_seq, count, body[_AFTER_CRC:]), ""


@dataclass
class ScanResult:
    records: list[Record] = field(default_factory=list)
    end: int = SEGMENT_HEADER_BYTES  # offset after the last valid record
    next_seq: int = 1  # the seq the next record must start at
    damage: str = ""  # why scanning stopped before the end of the bytes ("" = clean)
    corrupt_at: int | None = None  # offset of a valid record found AFTER the damage


def scan(buf: bytes | memoryview, first_seq: int, *, keep_payloads: bool = True) -> ScanResult:
    """Walk the records of a whole segment (header included) starting at ``first_seq``."""
    res = ScanResult(end=SEGMENT_HEADER_BYTES, next_seq=first_seq)
    off = SEGMENT_HEADER_BYTES
    size = len(buf)
    while off < size:
        rec, why = parse_record(buf, off)
        if rec is not None and rec.first_seq != res.next_seq:
            why = f"record claims seq {rec.first_seq}, expected {res.next_seq}"
            rec = None
        if rec is None:
            res.damage = why
            res.corrupt_at = find_valid_after(buf, off, res.next_seq)
            return res
        res.records.append(
            rec
            if keep_payloads
            else Record(rec.offset, rec.size, rec.first_seq, rec.entry_count, b"")
        )
        off = rec.end
        res.end = off
        res.next_seq = rec.last_seq + 1
    return res


def find_valid_after(buf: bytes | memoryview, offset: int, expected_seq: int) -> int | None:
    """Offset of a valid record after damaged bytes at ``offset``, if there is one.

    Tries where the damaged header says the next record starts, then searches
    for records carrying the next few plausible sequences (the damaged record's
    own count, then expected+1..expected+RESYNC_SEQS). Cheap (bytes.find in C);
    it finds every valid record unless the damaged record both lost its length
    and its count field and held more than RESYNC_SEQS entries.
    """
    data = bytes(buf)
    candidates: list[int] = []
    if len(data) - offset >= RECORD_HEADER_BYTES:
        length, _crc, _first, count = RECORD_HEADER.unpack_from(data, offset)
        if _AFTER_CRC < length <= RECORD_BYTES_MAX:
            candidates.append(offset + 8 + length)
        seqs = [expected_seq + count] if 0 < count < 2**31 else []
    else:
        seqs = []
    seqs += [expected_seq + i for i in range(RESYNC_SEQS + 1)]
    for p in candidates:
        if p < len(data) and parse_record(data, p)[0] is not None:
            return p
    seen: set[int] = set()
    for s in seqs:
        if s in seen or s > SEQ_MAX:
            continue
        seen.add(s)
        needle = struct.pack(">Q", s)
        pos = data.find(needle, offset + 1 + 8)
        while pos >= 0:
            start = pos - 8
            rec = parse_record(data, start)[0]
            if rec is not None and rec.first_seq == s:
                return start
            pos = data.find(needle, pos + 1)
    return None


MARKER_SYNCED = 1  # flag: the writer fsyncs before it moves the marker (always/batch)


def encode_marker(seq: int, flags: int = 0) -> bytes:
    """The ``durable`` marker file: u64 seq, u32 crc32c(seq + flags), u32 flags."""
    raw = struct.pack(">Q", seq)
    tail = struct.pack(">I", flags)
    return raw + struct.pack(">I", crc32c.crc32c(raw + tail)) + tail


def decode_marker(data: bytes) -> tuple[int, int] | None:
    """(seq, flags), or None when the marker is missing, short or torn."""
    if len(data) < 16:
        return None
    raw, (crc,), tail = data[:8], struct.unpack_from(">I", data, 8), data[12:16]
    if crc32c.crc32c(raw + tail) != crc:
        return None
    return int(struct.unpack(">Q", raw)[0]), int(struct.unpack(">I", tail)[0])
