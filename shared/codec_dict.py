"""zstd dictionaries for the wire format (see docs/wire-format.md, "Dictionaries").

Small messages (a transaction or two of JSON-ish values) compress poorly on
their own because zstd has no history to refer back to. A dictionary trained
on typical message bodies gives it that history. The dictionary is identified
by a 32-bit id carried in the message header; readers load dictionaries by id.

Pure: no I/O. Storing and distributing dictionaries is the caller's business.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import zstandard

DICT_ID_MAX = 2**32 - 1


@dataclass(frozen=True, slots=True)
class ZstdDictionary:
    """A zstd dictionary and the id that names it in message headers.

    ``dict_id`` 0 means "no dictionary" on the wire, so it is not a valid id.
    """

    dict_id: int
    data: bytes

    def __post_init__(self) -> None:
        if not 1 <= self.dict_id <= DICT_ID_MAX:
            raise ValueError(f"dict_id must be in 1..{DICT_ID_MAX}, got {self.dict_id}")
        if not self.data:
            raise ValueError("dictionary data is empty")

    def zstd_dict(self) -> zstandard.ZstdCompressionDict:
        """The zstandard object (auto-detects trained vs raw-content dictionaries)."""
        return zstandard.ZstdCompressionDict(self.data)


def train_dictionary(samples: Sequence[bytes], size_bytes: int = 16384) -> ZstdDictionary:
    """Train a dictionary from sample message bodies.

    Best samples are the bodies the encoder will compress; ``training_samples``
    in ``walship.shared.codec`` produces them from transactions. zstd needs a
    reasonable amount of material (roughly 100 samples and several times
    ``size_bytes`` in total); too little raises ValueError.
    """
    if size_bytes < 256:
        raise ValueError(f"size_bytes must be >= 256, got {size_bytes}")
    if not samples:
        raise ValueError("no samples to train a dictionary from")
    try:
        trained = zstandard.train_dictionary(size_bytes, list(samples))
    except zstandard.ZstdError as exc:
        total = sum(len(s) for s in samples)
        raise ValueError(
            f"zstd could not train a {size_bytes}-byte dictionary from {len(samples)} samples "
            f"({total} bytes): {exc}; give it more or larger samples"
        ) from exc
    dict_id = trained.dict_id()
    if dict_id == 0:
        raise ValueError("zstd produced a dictionary without an id; give it more samples")
    return ZstdDictionary(dict_id=dict_id, data=trained.as_bytes())
