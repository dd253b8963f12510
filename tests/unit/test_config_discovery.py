"""backends[].discovery and the endpoints file: what loads, what is refused (naming the key), the dump."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from llmproxy.config import ConfigError, dump_config, load_config, parse_config
from llmproxy.config.discovery import Endpoint, parse_endpoints, resolver_address
from llmproxy.config.model import DiscoveryConfig


def entry(discovery: Any, **settings: Any) -> dict:
    return {"backends": [{"name": "vllm", "discovery": discovery, **settings}]}


def test_a_dns_entry_loads_with_its_defaults():
    (backend,) = parse_config(entry({"dns": "VLLM.default.svc.cluster.local", "port": 8000}, type="vllm")).backends
    assert backend.discovery == DiscoveryConfig(dns="vllm.default.svc.cluster.local", port=8000, interval=10.0)
    assert (backend.url, backend.type) == ("", "vllm")


def test_resolvers_are_normalised_to_ip_and_port():
    def resolver(text: str) -> str:
        return parse_config(entry({"dns": "a.svc", "port": 80, "resolver": text})).backends[0].discovery.resolver
    assert resolver("127.0.0.1:5353") == "127.0.0.1:5353"
    assert resolver("10.96.0.10") == "10.96.0.10:53"
    assert resolver("[fd00::a]:5353") == "[fd00::a]:5353"
    assert resolver_address(resolver("[fd00::a]")) == ("fd00::a", 53)


def test_the_name_defaults_to_the_dns_name_or_the_file_name(tmp_path: Path):
    (tmp_path / "fleet.yaml").write_text("endpoints: []\n")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"backends": [{"discovery": {"dns": "vllm.svc", "port": 8000}},
                                                   {"discovery": {"file": "fleet.yaml"}}]}))
    dns, file = load_config(config).backends
    assert (dns.name, file.name) == ("vllm.svc", "fleet.yaml")
    assert file.discovery.file == str(tmp_path / "fleet.yaml") and file.discovery.interval == 2.0


@pytest.mark.parametrize(("data", "message"), [
    (entry({}), "backends[0].discovery: give either dns (a name to resolve) or file (an endpoints file to watch)"),
    (entry({"dns": "a.svc", "file": "x.yaml"}), "backends[0].discovery: give either dns"),
    (entry({"dns": "a.svc"}), "backends[0].discovery.port: is required with dns"),
    (entry({"dns": "a.svc", "port": 70000}), "backends[0].discovery.port: must be a port between 1 and 65535"),
    (entry({"dns": "a b", "port": 80}), "backends[0].discovery.dns: must not contain whitespace"),
    (entry({"dns": "-a.svc", "port": 80}), "backends[0].discovery.dns: invalid host name"),
    (entry({"dns": "a.svc", "port": 80, "interval": "0s"}), "backends[0].discovery.interval: must be greater than 0"),
    (entry({"dns": "a.svc", "port": 80, "resolver": "kube-dns:53"}), "backends[0].discovery.resolver: must be a DNS"),
    (entry({"dns": "a.svc", "port": 80, "resolver": "10.0.0.1:0"}), "backends[0].discovery.resolver: must be a DNS"),
    (entry({"dns": "a.svc", "port": 80, "resolvr": "10.0.0.1"}),
     'backends[0].discovery.resolvr: unknown key (did you mean "resolver"?)'),
    (entry({"file": "x.yaml", "port": 80}), "backends[0].discovery.port: applies to dns only"),
    (entry({"file": "x.yaml", "resolver": "10.0.0.1"}), "backends[0].discovery.resolver: applies to dns only"),
    (entry("vllm.svc"), "backends[0].discovery: must be a mapping"),
    (entry({"dns": "a.svc", "port": 80}, url="http://a:80"), "backends[0].url: give url or discovery, not both"),
    ({"backends": [{"name": "a@b", "discovery": {"dns": "a.svc", "port": 80}}]},
     'backends[0].name: must not contain "@"'),
    ({"backends": [{"name": "a", "discovery": {"dns": "a.svc", "port": 80}},
                   {"name": "a@10.0.0.1:80", "url": "http://10.0.0.1"}]},
     "backends[1].name: \"a@10.0.0.1:80\" is how the backends discovery finds for \"a\" are named"),
    ({"backends": [{"name": "a", "discovery": {"dns": "a.svc", "port": 80}}],
      "routes": [{"id": "r", "match": {}, "strategy": {"type": "failover", "upstreams": ["a"]}}]},
     'routes[0].strategy.upstreams[0]: "a" is a discovery entry'),
])
def test_bad_discovery_blocks_are_refused_naming_the_key(data: dict, message: str):
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert str(info.value).startswith(message), str(info.value)


def test_an_endpoints_file_is_read_at_load_and_a_broken_one_refused(tmp_path: Path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(entry({"file": "endpoints.yaml"})))
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert str(info.value) == f"backends[0].discovery.file: {tmp_path / 'endpoints.yaml'}: file not found"
    (tmp_path / "endpoints.yaml").write_text("endpoints:\n  - {address: 10.0.0.1, port: '8000', weight: 0}\n")
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert str(info.value).endswith("endpoints.yaml: endpoints[0].weight: must be a positive integer, got 0")


def test_llm_d_endpoints_files_load_with_our_weight_and_models():
    document = yaml.safe_load("""
endpoints:
  - name: vllm-0
    namespace: default
    address: "10.0.0.1"
    port: "8000"
    metricsHost: "10.0.0.1:9000"
    labels: {zone: a}
  - name: vllm-1
    address: "fd00::2"
    port: 8001
    weight: 3
    models: [llama-3.1-8b, qwen]
""")
    assert parse_endpoints(document) == (
        Endpoint("10.0.0.1", 8000, name="vllm-0"),
        Endpoint("fd00::2", 8001, name="vllm-1", weight=3, models=("llama-3.1-8b", "qwen")))
    assert parse_endpoints({"endpoints": []}) == ()


@pytest.mark.parametrize(("document", "message"), [
    (None, "endpoints: is required"),  # an empty file: more likely caught half-written than meant
    ({"endpoint": []}, "endpoints: is required"),
    ({"endpoints": {"a": 1}}, "endpoints: must be a list"),
    ({"endpoints": [{"address": "10.0.0.1"}]}, "endpoints[0].port: is required"),
    ({"endpoints": [{"port": 80}]}, "endpoints[0].address: is required"),
    ({"endpoints": [{"address": "vllm-0.local", "port": 80}]}, "endpoints[0].address: must be an IP address"),
    ({"endpoints": [{"address": 167772161, "port": 80}]}, "endpoints[0].address: must be an IP address"),
    ({"endpoints": [{"address": "10.0.0.1", "port": "http"}]}, "endpoints[0].port: must be a positive integer"),
    ({"endpoints": [{"address": "10.0.0.1", "port": 80, "models": []}]}, "endpoints[0].models: must be a non-empty"),
    ({"endpoints": [{"address": "10.0.0.1", "port": 80, "zone": "a"}]}, "endpoints[0].zone: unknown key"),
    ({"endpoints": [{"address": "10.0.0.1", "port": 80}, {"address": "10.0.0.1", "port": "80"}]},
     "endpoints[1]: same address and port as endpoints[0]"),
    ({"endpoints": [{"name": "a", "address": "10.0.0.1", "port": 80}, {"name": "a", "address": "10.0.0.2",
                                                                        "port": 80}]},
     "endpoints[1]: same name as endpoints[0]"),
])
def test_bad_endpoints_files_are_refused_naming_the_key(document: Any, message: str):
    with pytest.raises(ConfigError) as info:
        parse_endpoints(document)
    assert str(info.value).startswith(message), str(info.value)


def test_the_dump_of_a_discovery_entry_loads_back(tmp_path: Path):
    (tmp_path / "endpoints.yaml").write_text("endpoints: []\n")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"backends": [
        {"name": "vllm", "discovery": {"dns": "vllm.svc", "port": 8000, "resolver": "127.0.0.1:5353",
                                       "interval": "500ms"}},
        {"name": "metal", "discovery": {"file": "endpoints.yaml"}}]}))
    loaded = load_config(config)
    dumped = dump_config(loaded)
    assert yaml.safe_load(dumped)["backends"][0]["discovery"] == {
        "dns": "vllm.svc", "port": 8000, "interval": "500ms", "resolver": "127.0.0.1:5353"}
    again = tmp_path / "again.yaml"
    again.write_text(dumped)
    assert load_config(again).backends == loaded.backends
