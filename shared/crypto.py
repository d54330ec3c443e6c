"""Optional payload encryption at rest: a keyring of named AES-256-GCM keys.

Pure apart from drawing random nonces. Used by the wire codec (Kafka message
payloads) and the snapshot chunk format; docs/wire-format.md ("Encryption")
documents the bytes.

An encrypted payload is::

    offset size field
    0      4    key_id     u32 big-endian, 1..2**32-1: which key of the ring
    4      12   nonce      random (os.urandom) per payload
    16     n+16 sealed     AES-256-GCM ciphertext of the n plaintext bytes, then the 16-byte tag

The caller passes associated data (AAD): the message or chunk header, so
header fields are authenticated along with the payload.

Key rotation: readers hold old and new keys (the key id in each payload picks
one); writers encrypt with the current id. Random 96-bit nonces stay safe for
about 2**32 payloads per key (NIST SP 800-38D), so rotate long before that.
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from walship.shared.errors import DecodeError

__all__ = [
    "KEY_BYTES",
    "KEY_ID_MAX",
    "NONCE_BYTES",
    "OVERHEAD_BYTES",
    "TAG_BYTES",
    "Keyring",
    "decode_key",
]

KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_ID_MAX = 2**32 - 1
_KEY_ID = struct.Struct(">I")
_PREFIX_BYTES = _KEY_ID.size + NONCE_BYTES
OVERHEAD_BYTES = _PREFIX_BYTES + TAG_BYTES  # 32: what encryption adds to a payload


def decode_key(text: str) -> bytes:
    """A base64 key -> its 32 bytes; ValueError (never quoting the key) otherwise."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not valid base64") from None
    if len(key) != KEY_BYTES:
        raise ValueError(f"must decode to {KEY_BYTES} bytes (AES-256), got {len(key)}")
    return key


def _check_key_id(key_id: int) -> None:
    if not 1 <= key_id <= KEY_ID_MAX:
        raise ValueError(f"key id must be in 1..{KEY_ID_MAX}, got {key_id}")


class Keyring:
    """Named 32-byte keys; ``current_id`` (if set) is the key new data is encrypted with.

    The key bytes never appear in ``repr``/``str`` or in any error message.
    """

    def __init__(self, keys: Mapping[int, bytes], current_id: int | None = None) -> None:
        self._aead: dict[int, AESGCM] = {}
        for key_id, key in keys.items():
            _check_key_id(key_id)
            if len(key) != KEY_BYTES:
                raise ValueError(f"key {key_id} has {len(key)} bytes, AES-256 needs {KEY_BYTES}")
            self._aead[key_id] = AESGCM(bytes(key))
        if current_id is not None and current_id not in self._aead:
            raise ValueError(f"current key id {current_id} is not in the keyring")
        self._current_id = current_id

    @classmethod
    def from_base64(cls, keys: Mapping[int, str], current_id: int | None = None) -> Keyring:
        """A keyring from base64 keys (as settings hold them)."""
        decoded: dict[int, bytes] = {}
        for key_id, text in keys.items():
            try:
                decoded[key_id] = decode_key(text)
            except ValueError as exc:
                raise ValueError(f"key {key_id} {exc}") from None
        return cls(decoded, current_id)

    @property
    def current_id(self) -> int | None:
        return self._current_id

    @property
    def key_ids(self) -> frozenset[int]:
        return frozenset(self._aead)

    def __repr__(self) -> str:
        return f"Keyring(key_ids={sorted(self._aead)}, current_id={self._current_id})"

    def encrypt(self, key_id: int, plaintext: bytes, aad: bytes) -> bytes:
        """key_id (u32 BE) + nonce + AES-256-GCM(plaintext) + tag, authenticating ``aad``."""
        aead = self._aead.get(key_id)
        if aead is None:
            raise ValueError(f"key id {key_id} is not in the keyring")
        nonce = os.urandom(NONCE_BYTES)
        return _KEY_ID.pack(key_id) + nonce + aead.encrypt(nonce, plaintext, aad)

    def decrypt(self, data: bytes | memoryview, aad: bytes | memoryview, *, what: str) -> bytes:
        """Inverse of :meth:`encrypt` for untrusted bytes: only DecodeError escapes.

        ``what`` names the thing decrypted in messages ("message", "snapshot chunk").
        """
        if len(data) < OVERHEAD_BYTES:
            raise DecodeError(
                f"encrypted {what} payload of {len(data)} bytes is shorter than the "
                f"{OVERHEAD_BYTES} bytes of key id, nonce and tag"
            )
        key_id = key_id_of(data)
        aead = self._aead.get(key_id)
        if aead is None:
            held = ", ".join(map(str, sorted(self._aead))) or "none"
            raise DecodeError(
                f"{what} is encrypted with key {key_id}, which this keyring does not hold "
                f"(holds: {held}); configure encryption_keys",
                key_id=key_id,
            )
        nonce = bytes(data[_KEY_ID.size : _PREFIX_BYTES])
        try:
            return aead.decrypt(nonce, bytes(data[_PREFIX_BYTES:]), bytes(aad))
        except InvalidTag:
            raise DecodeError(
                f"{what} failed AES-GCM authentication with key {key_id}: wrong key or tampered",
                key_id=key_id,
            ) from None


def key_id_of(data: bytes | memoryview) -> int:
    """The key id an encrypted payload names (caller checked its length)."""
    (key_id,) = _KEY_ID.unpack_from(data)
    return int(key_id)
