"""IP allow/deny lists end to end: `security.ip_whitelist` / `ip_blacklist` and a key's `allowed_ips`.

The proxy runs on loopback, so the addresses under test arrive the way a load balancer would bring them:
127.0.0.1 is a trusted proxy and X-Forwarded-For names the client. Connections judged by their own address
(no trusted proxy in front) are refused at accept: the 403 arrives before the client sends a byte.
Every refusal is checked twice: the answer, and the backend, which must not have received anything.
"""

from __future__ import annotations

import json
import socket

import pytest
import yaml

from tests.support import (
    CHAT,
    Proc,
    ResponseReader,
    access_log,
    free_port,
    metric_value,
    mock_posts,
    post_request,
    raw_connect,
    send_request,
    sighup,
    start_proxy,
    wait_for,
    write_config,
)

PATH = "/v1/chat/completions"
GUIDE = {"ip_whitelist": ["192.168.1.0/24", "10.0.0.5"], "ip_blacklist": ["1.2.3.4"]}  # the guide's, as is
KEY_ANYWHERE = "sk-test-ip-anywhere-0123456789"
KEY_OFFICE = "sk-test-ip-office-only-0123456789"


@pytest.fixture(scope="module")
def behind_lb(mock_vllm, tmp_path_factory):
    """A proxy behind a trusted load balancer (127.0.0.1): the guide's lists plus IPv6 ones, and two keys."""
    security = {"ip_whitelist": [*GUIDE["ip_whitelist"], "2001:db8::/32", "172.16.0.0/12", "::ffff:198.51.100.0/120"],
                "ip_blacklist": [*GUIDE["ip_blacklist"], "192.168.1.66", "2001:db8::bad", "172.16.5.0/24"]}
    directory = tmp_path_factory.mktemp("lb")
    proxy = start_proxy(directory, [{"url": mock_vllm.url, "type": "vllm"}],
                        server={"listen": "127.0.0.1:0", "trusted_proxies": ["127.0.0.1"]}, security=security,
                        auth={"enabled": True, "keys": [{"key": KEY_ANYWHERE},
                                                        {"key": KEY_OFFICE, "allowed_ips": ["192.168.1.0/28",
                                                                                            "2001:db8:1::/48"]}]})
    proxy.directory = directory  # where its access log is
    yield proxy
    proxy.stop()


def forwarded(proxy: Proc, xff: list[str] | None, key: str = KEY_ANYWHERE) -> tuple[int, dict]:
    """One request with an X-Forwarded-For header line per item of `xff` (None: no such header)."""
    request = post_request(PATH, CHAT, {"Authorization": f"Bearer {key}"})
    head, _, body = request.partition(b"\r\n\r\n")
    lines = b"".join(b"\r\nX-Forwarded-For: " + value.encode() for value in xff or ())
    with raw_connect(proxy.port) as sock:
        sock.sendall(head + lines + b"\r\n\r\n" + body)
        reader = ResponseReader(sock).read_head()
        content, _ = reader.read_body()
    return reader.status, json.loads(content)


# (case, X-Forwarded-For header values, allowed). 127.0.0.1 is the trusted proxy that connects.
FORWARDED = [
    ("network address of a /24", ["192.168.1.0"], True),
    ("broadcast address of a /24", ["192.168.1.255"], True),
    ("just above the /24", ["192.168.2.0"], False),
    ("just below the /24", ["192.168.0.255"], False),
    ("single address", ["10.0.0.5"], True),
    ("the single address's neighbour", ["10.0.0.6"], False),
    ("blacklisted", ["1.2.3.4"], False),
    ("blacklist wins over the whitelist", ["192.168.1.66"], False),
    ("blacklisted /24 inside a whitelisted /12", ["172.16.5.9"], False),
    ("whitelisted /12 around it", ["172.16.6.1"], True),
    ("top of the /12", ["172.31.255.255"], True),
    ("above the /12", ["172.32.0.0"], False),
    ("IPv6 in a whitelisted /32", ["2001:db8::1"], True),
    ("IPv6 last address of the /32", ["2001:db8:ffff:ffff:ffff:ffff:ffff:ffff"], True),
    ("IPv6 just above the /32", ["2001:db9::"], False),
    ("IPv6 blacklisted inside the whitelist", ["2001:db8::bad"], False),
    ("IPv6 written in full", ["2001:0db8:0000:0000:0000:0000:0000:0001"], True),
    ("IPv4-mapped IPv6", ["::ffff:192.168.1.7"], True),
    ("IPv4 in an IPv4-mapped whitelist entry", ["198.51.100.7"], True),
    ("IPv4-mapped in an IPv4-mapped whitelist entry", ["::ffff:198.51.100.8"], True),
    ("IPv4 next to an IPv4-mapped whitelist entry", ["198.51.101.7"], False),
    ("IPv6 with a port", ["[2001:db8::7]:443"], True),
    ("IPv4 with a port", ["192.168.1.7:5000"], True),
    ("right-most entry is the client", ["10.0.0.5, 1.2.3.4"], False),
    ("a forged left entry proves nothing", ["1.2.3.4, 10.0.0.5"], True),
    ("trusted hops on the right are skipped", ["10.0.0.5, 127.0.0.1"], True),
    ("two header lines are one list", ["1.2.3.4", "192.168.1.9"], True),
    ("no X-Forwarded-For: the proxy itself is the client", None, False),
    ("not an address", ["not-an-ip"], False),
    ("empty", [""], False),
]


@pytest.mark.parametrize(("case", "xff", "allowed"), FORWARDED, ids=[c[0] for c in FORWARDED])
def test_forwarded_client_address_is_judged(behind_lb, mock_vllm, case, xff, allowed):
    before = len(mock_posts(mock_vllm))
    status, body = forwarded(behind_lb, xff)
    if allowed:
        assert status == 200, (case, body)
        assert len(mock_posts(mock_vllm)) == before + 1
    else:
        assert status == 403, (case, body)
        assert body["error"]["code"] == "ip_not_allowed" and "1.2.3.4" not in body["error"]["message"]
        assert len(mock_posts(mock_vllm)) == before


def test_a_keys_allowed_ips_apply_after_auth_and_refuse_as_a_bad_key_does(behind_lb, mock_vllm):
    before = len(mock_posts(mock_vllm))
    assert forwarded(behind_lb, ["192.168.1.15"], KEY_OFFICE)[0] == 200  # last address of its /28
    assert forwarded(behind_lb, ["2001:db8:1:2::3"], KEY_OFFICE)[0] == 200
    refused = [forwarded(behind_lb, [address], KEY_OFFICE) for address in ("192.168.1.16", "10.0.0.5",
                                                                            "2001:db8:2::1")]
    # The same answer as a key that does not exist: a valid key used from elsewhere is not confirmed valid.
    bad_key = forwarded(behind_lb, ["192.168.1.16"], "sk-not-a-key-at-all-000000")
    assert bad_key[0] == 401
    assert refused == [bad_key] * 3
    assert forwarded(behind_lb, ["10.0.0.5"], KEY_ANYWHERE)[0] == 200  # the other key may, from there
    assert len(mock_posts(mock_vllm)) == before + 3
    # The security rules come first: a refused address is refused before any key is looked at.
    assert forwarded(behind_lb, ["1.2.3.4"], "sk-not-a-key-at-all-000000")[0] == 403
    assert denied(behind_lb, 'check="key"') == 3
    # The log says the real reason.
    reason = "ip_not_allowed: client address 192.168.1.16 not in"
    wait_for(lambda: sum(reason in (r.get("error") or "") for r in access_log(behind_lb.directory)) == 1)


def denied(proxy: Proc, labels: str) -> float:
    """llmproxy_ip_denied_total as /metrics says it to an allowed client (the rules apply to /metrics too)."""
    with raw_connect(proxy.port) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.0.0.5\r\n\r\n")
        reader = ResponseReader(sock).read_head()
        assert reader.status == 200
        text, _ = reader.read_body()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.decode().splitlines()
               if line.startswith("llmproxy_ip_denied_total{") and labels in line)


def refused_at_accept(port: int, host: str = "127.0.0.1") -> tuple[int, dict]:
    """Connect and send nothing: the 403 must come all the same."""
    with socket.create_connection((host, port), timeout=5) as sock:
        reader = ResponseReader(sock).read_head()
        body, _ = reader.read_body()
        assert reader.headers["connection"] == "close"
    return reader.status, json.loads(body)


def test_the_guides_lists_refuse_an_unlisted_client_at_accept(mock_vllm, tmp_path):
    # The guide's config as is: 127.0.0.1 is in neither list, and no trusted proxy speaks for anyone.
    proxy = start_proxy(tmp_path, [{"url": mock_vllm.url, "type": "vllm"}], security=GUIDE)
    try:
        before = len(mock_posts(mock_vllm))
        status, body = refused_at_accept(proxy.port)
        assert status == 403 and body["error"]["code"] == "ip_not_allowed"
        # A client that sends its request at once gets the same answer (the lingering close keeps the
        # kernel from resetting the connection under the answer), and X-Forwarded-For from a peer no one
        # trusts changes nothing.
        for _ in range(5):
            with raw_connect(proxy.port) as sock:
                sock.sendall(post_request(PATH, CHAT, {"X-Forwarded-For": "10.0.0.5"}))
                reader = ResponseReader(sock).read_head()
                assert reader.status == 403
        assert len(mock_posts(mock_vllm)) == before
        wait_for(lambda: len([r for r in access_log(tmp_path) if r["status"] == 403]) == 6)
        assert {r["client"] for r in access_log(tmp_path)} == {"127.0.0.1"}
    finally:
        proxy.stop()


def test_untrusted_peers_forwarded_for_is_ignored(mock_vllm, tmp_path):
    # The peer (127.0.0.1) is whitelisted and no proxy is trusted: a blacklisted X-Forwarded-For is a claim.
    proxy = start_proxy(tmp_path, [{"url": mock_vllm.url, "type": "vllm"}],
                        server={"listen": "127.0.0.1:0", "trusted_proxies": ["10.9.9.9"]},
                        security={"ip_whitelist": ["127.0.0.0/8"], "ip_blacklist": ["1.2.3.4"]})
    try:
        reader, _, _ = send_request(proxy.port, CHAT, {"X-Forwarded-For": "1.2.3.4"})
        assert reader.status == 200
        assert metric_value(proxy, "llmproxy_ip_denied_total") == 0
    finally:
        proxy.stop()


def test_ipv6_peer_at_accept_and_reload(mock_vllm, tmp_path):
    port = free_port()
    proxy = start_proxy(tmp_path, [{"url": mock_vllm.url, "type": "vllm"}], server={"listen": f"[::1]:{port}"},
                        security={"ip_whitelist": ["::1"]})
    try:
        with socket.create_connection(("::1", proxy.port), timeout=5) as sock:
            sock.sendall(post_request(PATH, CHAT))
            assert ResponseReader(sock).read_head().status == 200
        # Reloadable: the next connection is judged by the new lists.
        config = tmp_path / "config.yaml"
        document = yaml.safe_load(config.read_text())
        document["security"] = {"ip_blacklist": ["::1/128"]}
        config.write_text(yaml.safe_dump(document))
        sighup(proxy)
        assert refused_at_accept(proxy.port, "::1")[0] == 403
        document["security"] = {"ip_whitelist": ["::/0"], "ip_blacklist": ["2001:db8::/32"]}
        config.write_text(yaml.safe_dump(document))
        sighup(proxy)
        with socket.create_connection(("::1", proxy.port), timeout=5) as sock:
            sock.sendall(post_request(PATH, CHAT))
            assert ResponseReader(sock).read_head().status == 200
    finally:
        proxy.stop()


def test_a_reload_that_blacklists_an_open_keep_alive_connections_peer_refuses_its_next_request(mock_vllm, tmp_path):
    backends = [{"url": mock_vllm.url, "type": "vllm"}]
    proxy = start_proxy(tmp_path, backends, security={"ip_whitelist": ["127.0.0.0/8"]})
    try:
        with raw_connect(proxy.port) as sock:
            sock.sendall(post_request(PATH, CHAT))
            reader = ResponseReader(sock).read_head()
            reader.read_body()
            assert reader.status == 200 and reader.headers.get("connection") != "close"
            write_config(tmp_path, backends, security={"ip_blacklist": ["127.0.0.1"]})
            sighup(proxy)
            before = len(mock_posts(mock_vllm))
            sock.sendall(post_request(PATH, CHAT))
            reader = ResponseReader(sock).read_head()
            body, _ = reader.read_body()
            assert reader.status == 403 and json.loads(body)["error"]["code"] == "ip_not_allowed"
            assert reader.headers["connection"] == "close"
            assert len(mock_posts(mock_vllm)) == before
    finally:
        proxy.stop()
