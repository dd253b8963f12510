"""The DNS codec against dnslib, a well-kept implementation, as the reference peer."""

from __future__ import annotations

import contextlib

import pytest
from dnslib import AAAA, CNAME, EDNS0, QTYPE, RCODE, RR, A, DNSRecord

from llmproxy.discovery.dnswire import AAAA as TYPE_AAAA
from llmproxy.discovery.dnswire import (
    EDNS_PAYLOAD,
    NOERROR,
    NXDOMAIN,
    Answer,
    DnsFormatError,
    decode_answer,
    encode_query,
)
from llmproxy.discovery.dnswire import A as TYPE_A


def reply_to(query: bytes, *records: RR, rcode: int = RCODE.NOERROR, truncated: bool = False) -> bytes:
    reply = DNSRecord.parse(query).reply()
    for record in records:
        reply.add_answer(record)
    reply.header.rcode = rcode
    reply.header.tc = int(truncated)
    return bytes(reply.pack())


def test_a_query_is_one_recursive_question_with_an_edns_payload_size():
    parsed = DNSRecord.parse(encode_query(4660, "vllm.default.svc.cluster.local", TYPE_AAAA))
    assert parsed.header.id == 4660 and parsed.header.rd == 1 and parsed.header.qr == 0
    assert [(str(q.qname), q.qtype) for q in parsed.questions] == [("vllm.default.svc.cluster.local.", QTYPE.AAAA)]
    (opt,) = parsed.ar
    assert opt.rtype == QTYPE.OPT and opt.rclass == EDNS_PAYLOAD


def test_an_answer_gives_every_address_record_of_the_chain():
    query = encode_query(7, "vllm.svc", TYPE_A)
    message = reply_to(query, RR("vllm.svc", QTYPE.CNAME, rdata=CNAME("pods.svc")),
                       RR("pods.svc", QTYPE.A, rdata=A("10.0.0.2")), RR("pods.svc", QTYPE.A, rdata=A("10.0.0.1")),
                       RR("pods.svc", QTYPE.AAAA, rdata=AAAA("fd00::1")))
    assert decode_answer(message, 7) == Answer(NOERROR, False, ("10.0.0.2", "10.0.0.1", "fd00::1"))


def test_an_answer_says_nxdomain_and_truncation():
    query = encode_query(9, "gone.svc", TYPE_A)
    assert decode_answer(reply_to(query, rcode=RCODE.NXDOMAIN), 9) == Answer(NXDOMAIN, False, ())
    assert decode_answer(reply_to(query, truncated=True), 9).truncated


def test_an_answer_with_an_edns_record_of_its_own_is_read():
    query = encode_query(11, "vllm.svc", TYPE_A)
    reply = DNSRecord.parse(query).reply()
    reply.add_answer(RR("vllm.svc", QTYPE.A, rdata=A("10.0.0.9")))
    reply.add_ar(EDNS0(udp_len=1232))
    assert decode_answer(bytes(reply.pack()), 11).addresses == ("10.0.0.9",)


@pytest.mark.parametrize("message", [
    b"",
    b"\x00\x07",  # shorter than a header
    bytes.fromhex("0007 0100 0000 0000 0000 0000"),  # a query, not an answer
    bytes.fromhex("0008 8180 0000 0000 0000 0000"),  # another query's id
])
def test_what_is_not_our_answer_is_refused(message: bytes):
    with pytest.raises(DnsFormatError):
        decode_answer(message, 7)


def test_any_cut_of_an_answer_is_refused_or_read_never_anything_else():
    query = encode_query(7, "vllm.svc", TYPE_A)
    message = reply_to(query, *(RR("vllm.svc", QTYPE.A, rdata=A(f"10.0.0.{i}")) for i in range(1, 6)))
    for end in range(len(message)):
        with contextlib.suppress(DnsFormatError):
            decode_answer(message[:end], 7)
    flipped = bytearray(message)
    for i in range(12, len(message)):  # every byte past the header made a label-type or a pointer byte
        for value in (0xC0, 0x80, 0xFF):
            flipped[i], kept = value, flipped[i]
            with contextlib.suppress(DnsFormatError):
                decode_answer(bytes(flipped), 7)
            flipped[i] = kept
