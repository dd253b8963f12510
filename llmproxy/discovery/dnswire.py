"""The few bytes of DNS (RFC 1035) that asking a server for A and AAAA records takes: sans-IO, no sockets.

A query asks for one name and type, with an EDNS(0) record (RFC 6891) offering 4096-byte UDP answers, so a
headless Service of a few hundred pods fits one datagram; a truncated answer says to ask again over TCP.
Only the answer section is read: every A/AAAA record in it counts, whatever its owner name, since a
recursive server answers a CNAME with the chain down to the addresses.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

A = 1
AAAA = 28
CLASS_IN = 1
OPT = 41
EDNS_PAYLOAD = 4096  # bytes of UDP answer we accept
NOERROR = 0
NXDOMAIN = 3
RCODE_NAMES = {1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}

_HEADER = struct.Struct("!HHHHHH")
_RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength
_FLAG_QR = 0x8000
_FLAG_TC = 0x0200
_FLAG_RD = 0x0100


class DnsFormatError(Exception):
    """An answer that is not a well-formed DNS message, or not the answer to our query."""


@dataclass(frozen=True, slots=True)
class Answer:
    rcode: int  # NOERROR, NXDOMAIN, ...
    truncated: bool  # TC: the server had more than fits a datagram; ask over TCP
    addresses: tuple[str, ...]  # the A/AAAA records of the answer section, as text


def encode_query(query_id: int, name: str, qtype: int) -> bytes:
    """A recursive query for `name` (a validated host name) and `qtype`, with an EDNS(0) OPT record."""
    header = _HEADER.pack(query_id, _FLAG_RD, 1, 0, 0, 1)
    question = _encode_name(name) + struct.pack("!HH", qtype, CLASS_IN)
    opt = b"\x00" + struct.pack("!HHIH", OPT, EDNS_PAYLOAD, 0, 0)  # root name, no options
    return header + question + opt


def _encode_name(name: str) -> bytes:
    labels = [label for label in name.rstrip(".").split(".") if label]
    encoded = b""
    for label in labels:
        raw = label.encode("ascii")
        if len(raw) > 63:
            raise ValueError(f"DNS label longer than 63 bytes: {label!r}")
        encoded += bytes([len(raw)]) + raw
    return encoded + b"\x00"


def decode_answer(message: bytes, query_id: int) -> Answer:
    """The answer to query `query_id`; raises DnsFormatError if `message` is malformed or another's."""
    if len(message) < _HEADER.size:
        raise DnsFormatError("message shorter than a DNS header")
    ident, flags, questions, answers, _, _ = _HEADER.unpack_from(message)
    if ident != query_id or not flags & _FLAG_QR:
        raise DnsFormatError("not the answer to our query")
    offset = _HEADER.size
    for _ in range(questions):
        offset = _skip_name(message, offset) + 4  # type, class
    addresses = []
    for _ in range(answers):
        offset = _skip_name(message, offset)
        if offset + _RR_FIXED.size > len(message):
            raise DnsFormatError("record cut short")
        rtype, rclass, _, length = _RR_FIXED.unpack_from(message, offset)
        offset += _RR_FIXED.size
        data = message[offset:offset + length]
        if len(data) != length:
            raise DnsFormatError("record data cut short")
        offset += length
        if rclass == CLASS_IN and (rtype, length) in ((A, 4), (AAAA, 16)):
            addresses.append(str(ipaddress.ip_address(bytes(data))))
    return Answer(rcode=flags & 0x000F, truncated=bool(flags & _FLAG_TC), addresses=tuple(addresses))


def _skip_name(message: bytes, offset: int) -> int:
    """The offset just past the (possibly compressed) name at `offset`."""
    while True:
        if offset >= len(message):
            raise DnsFormatError("name runs past the message")
        length = message[offset]
        if length == 0:
            return offset + 1
        if length & 0xC0 == 0xC0:  # a pointer ends the name
            if offset + 2 > len(message):
                raise DnsFormatError("name pointer cut short")
            return offset + 2
        if length & 0xC0:
            raise DnsFormatError("unknown label type")
        offset += 1 + length
