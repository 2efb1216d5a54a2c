"""Fluent Forward Protocol v1: the framing Fluent Bit's and Fluentd's `forward` outputs send.

Pure decoding and the handshake, no I/O (the server is `pipeline.sources.forward_server`),
so every captured byte stream can be checked here without a socket.

What real shippers send, and why each case is here (see the Fluent Bit 5.1.1 captures):
- Message `[tag, time, record(, option)]` (fluent-logger clients), Forward
  `[tag, [entry...](, option)]` (Fluent Bit's default), PackedForward `[tag, bin(, option)]`
  (Fluentd) and CompressedPackedForward (the same, `compressed: gzip`; Fluentd may send
  several gzip members back to back).
- An entry is `[time, record]`, or Fluent Bit v2+'s `[[time, metadata], record]`.
- time is an integer (`time_as_integer`), an EventTime (ext type 0: uint32 seconds, uint32
  nanoseconds, big endian), or, from lax clients, a float or a msgpack timestamp.
- Fluent Bit's PING carries its random salt as a msgpack *str* holding bytes that are not
  UTF-8, so strings are decoded with `surrogateescape`: nothing is refused for its bytes,
  and the exact bytes come back with `raw_bytes`.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack

# Why input was refused, as a metric label: a small fixed set.
BAD_INPUT_REASONS = ("malformed", "unknown_mode", "bad_entry", "bad_compression",
                     "auth_failed", "handshake", "disconnect_mid_frame", "tls")


class EventTime(NamedTuple):
    """The protocol's EventTime (ext type 0): exact to the nanosecond."""

    sec: int
    nsec: int

    @property
    def timestamp(self) -> float:
        return self.sec + self.nsec / 1e9


Time = EventTime | int | float


class ForwardError(Exception):
    """Input the protocol does not allow; `reason` is one of BAD_INPUT_REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class TooLarge(ForwardError):
    """A frame or its decompressed entries over the configured limit (not bad input:
    the shipper may resend it in smaller chunks)."""

    def __init__(self, message: str) -> None:
        super().__init__("too_large", message)


@dataclass(slots=True)
class Frame:
    """One top-level message: its mode, tag, entries `(time, record)` and option map."""

    mode: str  # Message | Forward | PackedForward | CompressedPackedForward
    tag: str
    entries: list[tuple[Time, dict[Any, Any]]]
    option: dict[str, Any] = field(default_factory=dict)
    # The events' Kafka values made by the compiled core straight from a packed payload
    # (`entries` is then empty): see `decode_frame`'s `relay_values`.
    values: list[bytes] | None = None

    @property
    def count(self) -> int:
        """How many events the frame holds, whichever form they are in."""
        return len(self.entries) if self.values is None else len(self.values)

    @property
    def chunk(self) -> Any:
        """The `chunk` option: when present the client waits for `{"ack": chunk}`."""
        return self.option.get("chunk")


def _ext_hook(code: int, data: bytes) -> Any:
    if code == 0 and len(data) == 8:
        return EventTime(*struct.unpack(">II", data))
    return msgpack.ExtType(code, data)


def unpacker(max_buffer_size: int) -> msgpack.Unpacker:
    """A streaming decoder as the server needs it: str kept whatever its bytes
    (surrogateescape), EventTime decoded, non-str map keys allowed (records are
    the client's), and no object bigger than `max_buffer_size`."""
    return msgpack.Unpacker(raw=False, unicode_errors="surrogateescape", ext_hook=_ext_hook,
                            strict_map_key=False, max_buffer_size=max_buffer_size)


_packer = msgpack.Packer(unicode_errors="surrogateescape")


def pack(obj: Any) -> bytes:
    """msgpack bytes of a reply (a str decoded with surrogateescape goes back as it came)."""
    return _packer.pack(obj)  # type: ignore[no-any-return]


def raw_bytes(value: str | bytes) -> bytes:
    """The bytes a str or bin field was sent as."""
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


def ack(chunk: Any) -> bytes:
    """The reply that lets the client drop its chunk: `{"ack": chunk}`."""
    return pack({"ack": chunk})


def decode_frame(obj: Any, max_bytes: int,
                 relay_values: Callable[[bytes], list[bytes] | None] | None = None) -> Frame:
    """The frame of one top-level object; ForwardError for what the spec does not allow.
    `max_bytes` bounds a gzip payload once decompressed.

    `relay_values` (the relay's compiled fast path, `pipeline._native`): the Kafka values
    of a (decompressed) PackedForward payload without a Python object per event, or None
    for a payload it leaves to Python (then decoded into `entries` as without it).
    """
    if type(obj) is not list or len(obj) < 2 or len(obj) > 4:
        raise ForwardError("unknown_mode", f"not a forward message: {_show(obj)}")
    tag = obj[0]
    if type(tag) is not str:
        raise ForwardError("unknown_mode", f"tag is not a string: {_show(obj)}")
    second = obj[1]
    kind = type(second)
    if kind is list:
        option = _option(obj, 2)
        return Frame("Forward", tag, [_entry(e) for e in second], option)
    if kind is bytes or kind is str:
        option = _option(obj, 2)
        payload = raw_bytes(second)
        compressed = option.get("compressed")
        mode = "PackedForward"
        if compressed == "gzip":
            payload, mode = gunzip(payload, max_bytes), "CompressedPackedForward"
        elif compressed not in (None, "text"):
            raise ForwardError("bad_compression", f"unknown compressed: {_show(compressed)}")
        if relay_values is not None:
            values = relay_values(payload)
            if values is not None:
                return Frame(mode, tag, [], option, values)
        return Frame(mode, tag, unpack_entries(payload), option)
    if len(obj) >= 3 and type(obj[2]) is dict:
        option = _option(obj, 3)
        return Frame("Message", tag, [(_time(second), obj[2])], option)
    raise ForwardError("unknown_mode", f"unknown event mode: {_show(obj)}")


def unpack_one(data: bytes) -> Any:
    """One whole object, decoded as the streaming `unpacker` decodes it."""
    return msgpack.unpackb(data, raw=False, unicode_errors="surrogateescape",
                           ext_hook=_ext_hook, strict_map_key=False)


def forward_frame(raw: bytes, estart: int, eend: int, max_bytes: int,
                  relay_values: Callable[[bytes], list[bytes] | None]) -> Frame:
    """A Forward-mode frame (`[tag, [entry, ...], option?]`, Fluent Bit's default) from
    its bytes, its entries at `raw[estart:eend]` (`_native.forward_frame_scan` found
    them). Entries back to back are a PackedForward payload, so the compiled relay takes
    them as they are; what it leaves goes through `decode_frame` as without it, so the
    frame is relayed (or refused) exactly as the Python path would."""
    values = relay_values(raw[estart:eend])
    if values is None:
        return decode_frame(unpack_one(raw), max_bytes)
    head = msgpack.Unpacker(raw=False, unicode_errors="surrogateescape")
    head.feed(raw[1:estart])
    tag = head.unpack()  # the scan checked it is a str; the entries' header follows
    option = _option([tag, None, unpack_one(raw[eend:])], 2) if raw[0] == 0x93 else {}
    return Frame("Forward", tag, [], option, values)


def _option(obj: list[Any], index: int) -> dict[str, Any]:
    if len(obj) <= index:
        return {}
    if len(obj) > index + 1:
        raise ForwardError("unknown_mode", f"unknown event mode: {_show(obj)}")
    option = obj[index]
    if option is None:
        return {}
    if type(option) is not dict:
        raise ForwardError("unknown_mode", f"option is not a map: {_show(option)}")
    return option


def _time(value: Any) -> Time:
    kind = type(value)
    if kind is EventTime or kind is int or kind is float:
        return value  # type: ignore[no-any-return]
    if kind is msgpack.Timestamp:
        return EventTime(value.seconds, value.nanoseconds)
    raise ForwardError("bad_entry", f"event time is not a time: {_show(value)}")


def _entry(entry: Any) -> tuple[Time, dict[Any, Any]]:
    if type(entry) is not list or len(entry) != 2 or type(entry[1]) is not dict:
        raise ForwardError("bad_entry", f"entry is not [time, record]: {_show(entry)}")
    head = entry[0]
    if type(head) is list:  # Fluent Bit v2+: [[time, metadata], record]
        if len(head) != 2 or type(head[1]) is not dict:
            raise ForwardError("bad_entry", f"entry header is not [time, metadata]: "
                                            f"{_show(head)}")
        head = head[0]
    return _time(head), entry[1]


def unpack_entries(payload: bytes) -> list[tuple[Time, dict[Any, Any]]]:
    """The entries of a (decompressed) PackedForward payload: msgpack objects back to back."""
    u = unpacker(max(len(payload), 1))
    u.feed(payload)
    entries = []
    end = 0  # where the last whole entry ends (tell() also counts a partial one's bytes)
    while True:
        try:
            entry = u.unpack()
        except msgpack.OutOfData:
            break
        except Exception as exc:  # msgpack's errors have no common base
            raise ForwardError("malformed", f"packed entries: {exc!r}") from None
        entries.append(_entry(entry))
        end = u.tell()
    if end != len(payload):
        raise ForwardError("malformed", f"packed entries end mid-entry ({end} of "
                                        f"{len(payload)} bytes decoded)")
    return entries


def gunzip(data: bytes, max_bytes: int) -> bytes:
    """Every gzip member of `data`, concatenated; TooLarge past `max_bytes` (a small
    payload may inflate to gigabytes)."""
    out: list[bytes] = []
    size = 0
    while data:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            part = d.decompress(data, max_bytes - size + 1)
        except zlib.error as exc:
            raise ForwardError("bad_compression", f"gzip payload: {exc}") from None
        size += len(part)
        if size > max_bytes or d.unconsumed_tail:
            raise TooLarge(f"gzip payload inflates past {max_bytes} bytes")
        if not d.eof:
            raise ForwardError("bad_compression", "gzip payload is truncated")
        out.append(part)
        data = d.unused_data
    return b"".join(out)


def _show(obj: Any, limit: int = 80) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[:limit] + "..."


# -- the handshake (shared_key) ------------------------------------------------------


def _digest(*parts: bytes) -> str:
    return hashlib.sha512(b"".join(parts)).hexdigest()


def helo(nonce: bytes, auth_salt: bytes = b"") -> bytes:
    """The server's first message when a shared key is set. `auth` is the salt of the
    password digest; empty when no username/password is asked for."""
    return pack(["HELO", {"nonce": nonce, "auth": auth_salt, "keepalive": True}])


@dataclass(slots=True)
class Ping:
    hostname: str
    salt: bytes
    digest: str
    username: str = ""
    password_digest: str = ""


def parse_ping(obj: Any) -> Ping:
    """The client's PING; ForwardError("handshake") when it is not one."""
    if (type(obj) is not list or len(obj) != 6 or obj[0] != "PING"
            or type(obj[1]) is not str or type(obj[2]) not in (str, bytes)
            or type(obj[3]) is not str or type(obj[4]) is not str
            or type(obj[5]) is not str):
        raise ForwardError("handshake", f"expected PING after HELO, got {_show(obj)}")
    return Ping(obj[1], raw_bytes(obj[2]), obj[3], obj[4], obj[5])


def ping_ok(ping: Ping, nonce: bytes, shared_key: str) -> bool:
    """Whether the client knows the key: sha512_hex(salt + hostname + nonce + key)."""
    expected = _digest(ping.salt, raw_bytes(ping.hostname), nonce, shared_key.encode())
    return ping.digest.lower() == expected


def user_ok(ping: Ping, auth_salt: bytes, users: dict[str, str]) -> bool:
    """Whether the PING's username is known and its password digest is
    sha512_hex(auth_salt + username + password)."""
    password = users.get(ping.username)
    if password is None:
        return False
    expected = _digest(auth_salt, raw_bytes(ping.username), password.encode())
    return ping.password_digest.lower() == expected


def pong(ping: Ping, nonce: bytes, shared_key: str, self_hostname: str, ok: bool,
         reason: str = "") -> bytes:
    """The server's answer; its digest proves to the client that the server has the key."""
    digest = _digest(ping.salt, self_hostname.encode(), nonce, shared_key.encode()) if ok else ""
    return pack(["PONG", ok, reason, self_hostname, digest])
