"""Address lists and the client address behind trusted proxies (llmproxy/iprules.py), without sockets."""

from __future__ import annotations

import pytest

from llmproxy.errors import ProxyError
from llmproxy.http11.request import RequestHead
from llmproxy.iprules import IpList, IpRules, client_address


def head(*forwarded_for: str) -> RequestHead:
    return RequestHead(b"GET", b"/", "1.1", [(b"x-forwarded-for", v.encode()) for v in forwarded_for], b"h", None,
                       False, True, False)


@pytest.mark.parametrize(("entries", "address", "inside"), [
    (["10.0.0.0/8"], "10.255.255.255", True),
    (["10.0.0.0/8"], "11.0.0.0", False),
    (["10.0.0.5"], "10.0.0.5", True),
    (["10.0.0.5"], "10.0.0.4", False),
    (["::1"], "::1", True),
    (["::1"], "0:0:0:0:0:0:0:1", True),
    (["fe80::/10"], "fe80::1%eth0", True),  # a zone is not part of the address
    (["192.0.2.0/24"], "::ffff:192.0.2.9", True),  # dual-stack sockets name IPv4 clients so
    (["192.0.2.0/24"], "::ffff:198.51.100.1", False),
    (["2001:db8::/32"], "192.0.2.1", False),
    (["0.0.0.0/0"], "not an address", False),
    ([], "10.0.0.1", False),
])
def test_ip_list_membership(entries, address, inside):
    ips = IpList(entries)
    assert (address in ips) is inside
    assert (address in ips) is inside  # the cached answer is the same


def test_blacklist_wins_and_an_empty_whitelist_lets_in_everyone_else():
    rules = IpRules([], ["203.0.113.7"], IpList([]))
    assert rules.allows("198.51.100.1") and not rules.allows("203.0.113.7")
    rules = IpRules(["198.51.100.0/24"], ["198.51.100.66"], IpList([]))
    assert rules.allows("198.51.100.65") and not rules.allows("198.51.100.66") and not rules.allows("10.0.0.1")


@pytest.mark.parametrize(("peer", "forwarded_for", "client"), [
    ("10.1.1.1", ["203.0.113.9"], "10.1.1.1"),  # not a trusted proxy: its claim is ignored
    ("127.0.0.1", [], "127.0.0.1"),  # a trusted proxy that says nothing is the client
    ("127.0.0.1", ["203.0.113.9"], "203.0.113.9"),
    ("127.0.0.1", ["198.51.100.1, 203.0.113.9"], "203.0.113.9"),  # the right-most one
    ("127.0.0.1", ["203.0.113.9, 127.0.0.2"], "203.0.113.9"),  # trusted hops skipped
    ("127.0.0.1", ["127.0.0.3, 127.0.0.2"], "127.0.0.3"),  # all trusted: the left-most
    ("127.0.0.1", ["198.51.100.1", "203.0.113.9"], "203.0.113.9"),  # several header lines
    ("127.0.0.1", ["[2001:db8::1]:8443"], "2001:db8::1"),
    ("127.0.0.1", ["203.0.113.9:1234"], "203.0.113.9"),
    ("127.0.0.1", ["2001:db8::1"], "2001:db8::1"),
    ("127.0.0.1", ["203.0.113.9, "], "203.0.113.9"),  # an empty entry is skipped
])
def test_client_address(peer, forwarded_for, client):
    assert client_address(peer, head(*forwarded_for), IpList(["127.0.0.0/8"])) == client


def test_a_trusted_proxys_requests_are_judged_by_the_client_it_forwards_for():
    rules = IpRules(["203.0.113.0/24"], [], IpList(["127.0.0.1"]))
    assert not rules.judged_at_accept("127.0.0.1") and rules.judged_at_accept("203.0.113.1")
    rules.check_request("127.0.0.1", head("203.0.113.9"))
    with pytest.raises(ProxyError) as refused:
        rules.check_request("127.0.0.1", head("203.0.113.9, 198.51.100.1"))
    assert refused.value.spec.status == 403 and "198.51.100.1" in refused.value.detail
    assert "198.51.100.1" not in refused.value.message  # the client is not told what the proxy saw
