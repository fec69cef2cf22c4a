"""The versioned binary frame every control message travels in.

Layout (all integers little-endian):

    offset  size  field
    0       4     magic            b"DAAP"
    4       1     version          protocol version (PROTOCOL_VERSION)
    5       1     msg_type         message type id (shared.messages.MESSAGE_TYPES)
    6       2     flags            bit 0 SIGNED, bit 1 ZSTD; other bits must be 0
    8       4     header_len       length of the JSON header in bytes
    12      4     payload_len      length of the binary payload in bytes (as sent)
    16      ...   header           UTF-8 canonical JSON object (sorted keys, no spaces)
    16+h    ...   payload          opaque bytes (parameters, encoded update), may be empty
    16+h+p  2     sig_len          only when SIGNED: length of the signature (<= 8192)
    18+h+p  ...   signature        only when SIGNED (shared.envelope says over what)

ZSTD: the payload is exactly one zstd frame (nothing after it); the receiver inflates it to
at most its payload limit. The JSON header must be byte for byte its canonical encoding.
A frame is exactly 16 + header_len + payload_len (+ 2 + sig_len) bytes. Lengths are checked
against the receiver's limits BEFORE anything past the fixed header is touched.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shared.errors import FrameError, FrameTooLarge, UnsupportedVersion

MAGIC = b"DAAP"
PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = frozenset({PROTOCOL_VERSION})
FIXED_HEADER = struct.Struct("<4sBBHII")
FIXED_LEN = FIXED_HEADER.size  # 16
MAX_HEADER_LEN = 64 * 1024
DEFAULT_MAX_PAYLOAD = 64 * 1024 * 1024
MAX_SIGNATURE_LEN = 8192
FLAG_SIGNED = 0x0001
FLAG_ZSTD = 0x0002
KNOWN_FLAGS = FLAG_SIGNED | FLAG_ZSTD
SIG_LEN = struct.Struct("<H")


@dataclass(frozen=True, kw_only=True, slots=True)
class Frame:
    version: int  # protocol version the sender spoke
    msg_type: int  # message type id
    flags: int  # flag bits (FLAG_SIGNED, FLAG_ZSTD)
    header: dict[str, Any]  # decoded JSON header
    payload: bytes  # binary payload as sent (still compressed when FLAG_ZSTD)
    signature: bytes | None = None  # the trailer of a SIGNED frame
    covered: bytes = b""  # SHA-256 of the bytes the signature covers (all but the trailer)

    @property
    def compressed(self) -> bool:
        return bool(self.flags & FLAG_ZSTD)


def canonical_json(obj: dict[str, Any]) -> bytes:
    """The one JSON encoding used on the wire: sorted keys, no whitespace, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False,
                      ensure_ascii=False).encode("utf-8")


def encode_frame(msg_type: int, header: dict[str, Any], payload: bytes = b"",
                 *, version: int = PROTOCOL_VERSION, flags: int = 0,
                 sign: Callable[[bytes], bytes] | None = None) -> bytes:
    """Build one frame; refuses a header no receiver accepts. The payload limit is the
    receiver's to enforce (it is configurable there). `payload` is sent as given (already
    compressed when `flags` has FLAG_ZSTD). With `sign`, the frame gets FLAG_SIGNED and a
    trailer `sign(sha256(frame without trailer))`."""
    if flags & ~KNOWN_FLAGS:
        raise FrameError(f"unknown flag bits {flags:#06x}", field="flags")
    if not 0 <= msg_type <= 255:
        raise FrameError(f"message type {msg_type} out of range 0..255", field="msg_type")
    try:
        head = canonical_json(header)
    except ValueError as exc:  # NaN / inf in the header
        raise FrameError(f"header is not canonical JSON: {exc}", field="header") from exc
    if len(head) > MAX_HEADER_LEN:
        raise FrameTooLarge(f"header {len(head)} bytes > limit {MAX_HEADER_LEN}", field="header")
    if sign is not None:
        flags |= FLAG_SIGNED
    fixed = FIXED_HEADER.pack(MAGIC, version, msg_type, flags, len(head), len(payload))
    body = b"".join((fixed, head, bytes(payload)))
    if sign is None:
        return body
    signature = sign(hashlib.sha256(body).digest())
    if len(signature) > MAX_SIGNATURE_LEN:
        raise FrameTooLarge(f"signature {len(signature)} bytes > {MAX_SIGNATURE_LEN}",
                            field="signature")
    return b"".join((body, SIG_LEN.pack(len(signature)), signature))


def peek_lengths(data: bytes | memoryview) -> tuple[int, int]:
    """(header_len, payload_len) declared by a frame's fixed header, without validating more."""
    if len(data) < FIXED_LEN:
        raise FrameError(f"truncated frame: {len(data)} bytes < fixed header {FIXED_LEN}")
    _, _, _, _, head_len, pay_len = FIXED_HEADER.unpack_from(data, 0)
    return head_len, pay_len


def decode_frame(data: bytes | bytearray | memoryview, *,
                 max_payload: int = DEFAULT_MAX_PAYLOAD) -> Frame:
    """Parse and validate one frame. Raises only `FrameError` and its subclasses."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise FrameError(f"frame must be bytes, got {type(data).__name__}")
    view = memoryview(data)
    if len(view) < FIXED_LEN:
        raise FrameError(f"truncated frame: {len(view)} bytes < fixed header {FIXED_LEN}")
    magic, version, msg_type, flags, head_len, pay_len = FIXED_HEADER.unpack_from(view, 0)
    if magic != MAGIC:
        raise FrameError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}", field="magic")
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedVersion(
            f"frame speaks protocol version {version}; this peer speaks version "
            f"{PROTOCOL_VERSION}", field="version")
    if flags & ~KNOWN_FLAGS:
        raise FrameError(f"unknown flag bits {flags:#06x} for version {version}", field="flags")
    if head_len > MAX_HEADER_LEN:
        raise FrameTooLarge(f"header {head_len} bytes > limit {MAX_HEADER_LEN}", field="header_len")
    if pay_len > max_payload:
        raise FrameTooLarge(f"payload {pay_len} bytes > limit {max_payload}", field="payload_len")
    end = FIXED_LEN + head_len + pay_len
    signature: bytes | None = None
    if flags & FLAG_SIGNED:
        if len(view) < end + SIG_LEN.size:
            raise FrameError(f"signed frame is {len(view)} bytes, too short for its "
                             f"{FIXED_LEN}+{head_len}+{pay_len} bytes and signature trailer",
                             field="length")
        (sig_len,) = SIG_LEN.unpack_from(view, end)
        if sig_len > MAX_SIGNATURE_LEN:
            raise FrameTooLarge(f"signature {sig_len} bytes > limit {MAX_SIGNATURE_LEN}",
                                field="signature")
        if len(view) != end + SIG_LEN.size + sig_len:
            raise FrameError(f"frame is {len(view)} bytes but declares {FIXED_LEN}+{head_len}"
                             f"+{pay_len}+2+{sig_len}", field="length")
        signature = bytes(view[end + SIG_LEN.size:])
    elif len(view) != end:
        raise FrameError(
            f"frame is {len(view)} bytes but declares {FIXED_LEN}+{head_len}+{pay_len}",
            field="length")
    raw_head = bytes(view[FIXED_LEN:FIXED_LEN + head_len])
    header = parse_header(raw_head)
    payload = bytes(view[FIXED_LEN + head_len:end])
    covered = hashlib.sha256(view[:end]).digest() if signature is not None else b""
    return Frame(version=version, msg_type=msg_type, flags=flags, header=header, payload=payload,
                 signature=signature, covered=covered)


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(f"duplicate key {key[:40]!r}")
            seen.add(key)
    return out


def parse_header(raw: bytes) -> dict[str, Any]:
    """The JSON header, which must be exactly its canonical encoding (`canonical_json`): an
    object, keys sorted and unique, no whitespace, numbers and strings as re-encoding writes
    them, no NaN/Infinity. Any other spelling of the same object is refused (`bad_frame`), so
    that every reader sees one header: no duplicate key that one parser reads first and
    another last."""
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_no_constants,
                            object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise FrameError(f"header is not canonical JSON: {exc}", field="header") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FrameError(f"header is not UTF-8 JSON: {exc}", field="header") from exc
    if not isinstance(header, dict):
        raise FrameError("header must be a JSON object", field="header")
    bad = _first_unencodable(header)
    if bad is not None:
        raise FrameError(f"header holds {bad}: not canonical JSON", field="header")
    try:
        canonical = canonical_json(header)
    except (ValueError, RecursionError) as exc:  # pragma: no cover - _first_unencodable
        raise FrameError(f"header is not canonical JSON: {exc}", field="header") from exc
    if canonical != raw:
        at = next((i for i, (a, b) in enumerate(zip(raw, canonical, strict=False)) if a != b),
                  min(len(raw), len(canonical)))
        raise FrameError(f"header is not canonical JSON (keys sorted, no whitespace, "
                         f"numbers and strings as canonical_json writes them): differs at "
                         f"byte {at}", field="header")
    return header


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def zstd_frame_size(data: bytes | memoryview) -> int:
    """Length in bytes of the one zstd frame `data` starts with (RFC 8878: frame header, blocks
    up to the last one, optional checksum), read from the block headers without inflating.
    Raises FrameError for anything but a zstd frame without a dictionary. The caller compares
    it with the payload's length: exactly one frame, nothing after it."""
    view = memoryview(data)
    n = len(view)
    if n < 6 or bytes(view[:4]) != ZSTD_MAGIC:
        raise FrameError("payload is not a zstd frame (magic)", field="payload")
    fhd = view[4]
    fcs_flag, single, checksum, dict_flag = fhd >> 6, (fhd >> 5) & 1, (fhd >> 2) & 1, fhd & 3
    if fhd & 0x08:
        raise FrameError("zstd frame header sets its reserved bit", field="payload")
    if dict_flag:
        raise FrameError("zstd frames with a dictionary are not accepted", field="payload")
    pos = 5 + (0 if single else 1)
    pos += (1 if single else 0, 2, 4, 8)[fcs_flag]
    while True:
        if pos + 3 > n:
            raise FrameError("zstd frame is truncated", field="payload")
        head = view[pos] | view[pos + 1] << 8 | view[pos + 2] << 16
        last, kind, size = head & 1, (head >> 1) & 3, head >> 3
        if kind == 3:
            raise FrameError("zstd block of the reserved type", field="payload")
        pos += 3 + (1 if kind == 1 else size)
        if last:
            break
    pos += 4 if checksum else 0
    if pos > n:
        raise FrameError("zstd frame is truncated", field="payload")
    return pos


def _first_unencodable(obj: Any) -> str | None:
    """What a re-encoding would refuse: lone surrogates, non-finite numbers (1e999)."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "a lone surrogate in a string"
        elif isinstance(item, float) and not math.isfinite(item):
            return "a number out of the float range"
    return None


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in a header")
