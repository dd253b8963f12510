"""The key ring (llmproxy/auth.py) and the caller it makes (llmproxy/tenant.py), without sockets."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from llmproxy.auth import KEY_ID_LENGTH, KeyRing
from llmproxy.config import parse_config
from llmproxy.errors import ProxyError
from llmproxy.http11.request import RequestHead
from llmproxy.ratelimit.memory import MemoryStore
from llmproxy.ratelimit.store import Limits
from llmproxy.tenant import Tenant

KEY = "sk-unit-test-key-0123456789"
OTHER = "sk-unit-test-key-other-9876"  # a second configured key
BACKENDS = [{"url": "http://b"}]


def config(**sections: Any):
    return parse_config({"backends": BACKENDS, **sections})


def head(*headers: tuple[bytes, bytes]) -> RequestHead:
    return RequestHead(b"POST", b"/v1/chat/completions", "1.1", list(headers), b"h", 0, False, True, False)


def ring(**auth: Any) -> KeyRing:
    cfg = config(auth={"enabled": True, "keys": [{"key": KEY, "user_id": "u"}], **auth},
                 rate_limit={"enabled": True, "per_key": {"requests_per_minute": 60}})
    return KeyRing(cfg.auth, cfg.rate_limit)


def two_keys() -> KeyRing:
    return ring(keys=[{"key": KEY, "user_id": "u"}, {"key": OTHER, "user_id": "v"}])


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def bearer(key: str) -> tuple[bytes, bytes]:
    return b"authorization", f"Bearer {key}".encode()


def api_key(key: str) -> tuple[bytes, bytes]:
    return b"x-api-key", key.encode()


def refusal(keys: KeyRing, *headers: tuple[bytes, bytes]) -> ProxyError:
    with pytest.raises(ProxyError) as refused:
        keys.authenticate(head(*headers))
    return refused.value


# --- finding the key ----------------------------------------------------------------------------------------


def test_a_key_is_found_by_digest_and_named_by_a_digest_prefix():
    key = ring().authenticate(head((b"authorization", f"Bearer {KEY}".encode())))
    assert key.key_id == hashlib.sha256(KEY.encode()).hexdigest()[:12]
    assert key.user_id == "u" and key.limits == Limits(requests_per_minute=60)
    assert KEY not in repr(key)


ACCEPTED = [
    ("bearer", [bearer(KEY)]),
    ("scheme in lower case", [(b"authorization", f"bearer {KEY}".encode())]),
    ("scheme in any case", [(b"authorization", f"bEaReR {KEY}".encode())]),
    ("whitespace around and between", [(b"authorization", f"  Bearer \t  {KEY}  ".encode())]),
    ("x-api-key", [api_key(KEY)]),
    ("x-api-key with whitespace", [(b"x-api-key", f"  {KEY} ".encode())]),
    ("beside unrelated headers", [(b"content-type", b"application/json"), api_key(KEY), (b"accept", b"*/*")]),
]


@pytest.mark.parametrize(("case", "headers"), ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_a_key_is_read_from_a_bearer_authorization_or_an_x_api_key(case: str, headers: list):
    assert ring().authenticate(head(*headers)).key_id == digest(KEY)[:KEY_ID_LENGTH]


SAME_KEY_TWICE = [
    ("bearer and x-api-key (Continue sends both)", [bearer(KEY), api_key(KEY)]),
    ("x-api-key and bearer", [api_key(KEY), bearer(KEY)]),
    ("two authorization headers", [bearer(KEY), bearer(KEY)]),
    ("two x-api-key headers", [api_key(KEY), api_key(KEY)]),
    ("the same key, spaced differently", [(b"authorization", f"Bearer   {KEY} ".encode()), api_key(f" {KEY}")]),
]


@pytest.mark.parametrize(("case", "headers"), SAME_KEY_TWICE, ids=[c[0] for c in SAME_KEY_TWICE])
def test_the_same_key_twice_is_one_key(case: str, headers: list):
    assert two_keys().authenticate(head(*headers)).user_id == "u"


# --- refusals -----------------------------------------------------------------------------------------------


UNAUTHORIZED = [
    ("no credentials", []),
    ("unknown key", [bearer(KEY + "x")]),
    ("a prefix of a key", [bearer(KEY[:-1])]),
    ("a key in another case", [bearer(KEY.upper())]),
    ("Basic scheme", [(b"authorization", b"Basic dXNlcjpwYXNz")]),
    ("the key under the Basic scheme", [(b"authorization", f"Basic {KEY}".encode())]),
    ("the key under another scheme", [(b"authorization", f"Token {KEY}".encode())]),
    ("key without scheme", [(b"authorization", KEY.encode())]),
    ("scheme glued to the key", [(b"authorization", f"Bearer:{KEY}".encode())]),
    ("empty bearer", [(b"authorization", b"Bearer")]),
    ("bearer with only spaces", [(b"authorization", b"Bearer    ")]),
    ("empty authorization", [(b"authorization", b"")]),
    ("bearer key with trailing junk", [(b"authorization", f"Bearer {KEY} extra".encode())]),
    ("unknown x-api-key", [api_key("nope-nope-nope-nope")]),
    ("empty x-api-key", [(b"x-api-key", b"")]),
    ("a scheme in x-api-key", [(b"x-api-key", f"Bearer {KEY}".encode())]),
    ("unconfigured header name", [(b"api-key", KEY.encode())]),
    ("key as proxy-authorization", [(b"proxy-authorization", f"Bearer {KEY}".encode())]),
    ("the digest instead of the key", [bearer(digest(KEY))]),
    ("the key id instead of the key", [bearer(digest(KEY)[:KEY_ID_LENGTH])]),
]


@pytest.mark.parametrize(("case", "headers"), UNAUTHORIZED, ids=[c[0] for c in UNAUTHORIZED])
def test_every_failure_is_the_same_401(case: str, headers: list):
    error = refusal(ring(), *headers)
    # One answer whatever went wrong: probing learns nothing.
    assert (error.kind, error.spec.status, error.message, error.headers) == (
        "unauthorized", 401, "Incorrect API key provided.", b"")


AMBIGUOUS = [
    ("bearer and x-api-key, two good keys", [bearer(KEY), api_key(OTHER)]),
    ("x-api-key and bearer, two good keys", [api_key(OTHER), bearer(KEY)]),
    ("two authorization headers", [bearer(KEY), bearer(OTHER)]),
    ("two x-api-key headers", [api_key(KEY), api_key(OTHER)]),
    ("a good key and a bad one", [api_key(KEY), bearer("nope")]),
    ("a bad key and a good one", [bearer("nope"), api_key(KEY)]),
    ("two bad keys", [bearer("nope-1"), api_key("nope-2")]),
]


@pytest.mark.parametrize(("case", "headers"), AMBIGUOUS, ids=[c[0] for c in AMBIGUOUS])
def test_two_different_keys_are_a_400(case: str, headers: list):
    error = refusal(two_keys(), *headers)
    assert (error.kind, error.spec.status, error.spec.code) == ("ambiguous_credentials", 400, "ambiguous_api_key")


NO_SECOND_KEY = [
    ("Basic authorization beside an x-api-key", [(b"authorization", b"Basic dXNlcjpwYXNz"), api_key(KEY)]),
    ("x-api-key beside a Basic authorization", [api_key(KEY), (b"authorization", b"Basic dXNlcjpwYXNz")]),
    ("empty x-api-key beside a bearer", [(b"x-api-key", b""), bearer(KEY)]),
    ("empty bearer beside an x-api-key", [(b"authorization", b"Bearer"), api_key(KEY)]),
]


@pytest.mark.parametrize(("case", "headers"), NO_SECOND_KEY, ids=[c[0] for c in NO_SECOND_KEY])
def test_a_header_without_a_key_is_no_second_key(case: str, headers: list):
    assert ring().authenticate(head(*headers)).user_id == "u"


def test_unknown_keys_leave_no_state_anywhere():
    keys, store = ring(), MemoryStore()
    for i in range(10_000):
        with pytest.raises(ProxyError):
            keys.authenticate(head((b"x-api-key", f"sk-guess-{i:08d}-xxxxxxxx".encode())))
    assert len(keys._keys) == 1 and store._scopes == {}


# --- header names -------------------------------------------------------------------------------------------


def test_custom_header_names_replace_the_defaults():
    custom = ring(header_names=["X-Custom-Key"])
    assert custom.authenticate(head((b"x-custom-key", KEY.encode()))).user_id == "u"
    with pytest.raises(ProxyError):
        custom.authenticate(head((b"authorization", f"Bearer {KEY}".encode())))


@pytest.mark.parametrize(("names", "header"), [
    (["X-CUSTOM-KEY"], (b"x-custom-key", KEY.encode())),  # configured in any case; the codec lower-cases
    (["x-custom-key"], (b"x-custom-key", KEY.encode())),
    (["X-Custom-Key", "Authorization"], bearer(KEY)),  # Authorization keeps its Bearer scheme
    (["X-API-Key"], api_key(KEY)),
])
def test_a_configured_header_name_carries_a_key(names: list[str], header: tuple[bytes, bytes]):
    assert ring(header_names=names).authenticate(head(header)).user_id == "u"


@pytest.mark.parametrize(("names", "header"), [
    (["X-Custom-Key"], bearer(KEY)),
    (["X-Custom-Key"], api_key(KEY)),
    (["X-API-Key"], bearer(KEY)),
    (["Authorization"], api_key(KEY)),
    (["X-Custom-Key"], (b"x-custom-key", f"Bearer {KEY}".encode())),  # only Authorization has a scheme
    (["Authorization"], (b"authorization", KEY.encode())),
])
def test_a_header_not_configured_carries_no_key(names: list[str], header: tuple[bytes, bytes]):
    assert refusal(ring(header_names=names), header).kind == "unauthorized"


# --- skip_paths ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [b"/health", b"/metrics"])
def test_the_default_skip_paths_are_skipped(path: bytes):
    assert ring().skips(path)


@pytest.mark.parametrize("path", [
    b"//health", b"/health/", b"/%68ealth", b"/health/../v1/x", b"/health/../v1/chat/completions",
    b"/health%2f..%2fv1%2fmodels", b"/HEALTH", b"/./health", b"/healthz", b"/health.json", b"health", b"",
    b"/metrics/../v1/completions", b"/metrics/", b"/v1/models", b"/v1/chat/completions", b"/",
])
def test_skip_paths_match_the_exact_path_only(path: bytes):
    assert not ring().skips(path)


def test_configured_skip_paths_replace_the_defaults():
    custom = ring(skip_paths=["/ready", "/v1/models"])
    assert custom.skips(b"/ready") and custom.skips(b"/v1/models")
    assert not custom.skips(b"/health") and not custom.skips(b"/metrics") and not custom.skips(b"/ready/")
    nothing = ring(skip_paths=[])
    assert not nothing.skips(b"/health") and not nothing.skips(b"/metrics")


@pytest.mark.parametrize("enabled", [True, False])
def test_the_ring_says_whether_auth_is_enabled(enabled: bool):
    cfg = config(auth={"enabled": enabled, "keys": [{"key": KEY}]})
    assert KeyRing(cfg.auth, cfg.rate_limit).enabled is enabled


# --- the tenant a key makes ---------------------------------------------------------------------------------


def test_a_key_configured_by_its_digest_is_found_by_the_key_itself():
    keys = ring(keys=[{"key_sha256": digest(OTHER).upper(), "user_id": "by-digest"}])
    found = keys.authenticate(head(bearer(OTHER)))
    assert found.user_id == "by-digest" and found.key_id == digest(OTHER)[:KEY_ID_LENGTH]


def test_each_key_makes_its_own_tenant():
    keys = ring(keys=[{"key": KEY, "user_id": "u", "models": ["m1", "m2"]}, {"key": OTHER}])
    first, second = keys.authenticate(head(api_key(KEY))), keys.authenticate(head(api_key(OTHER)))
    assert first == Tenant(key_id=digest(KEY)[:KEY_ID_LENGTH], user_id="u", models=frozenset({"m1", "m2"}),
                           limits=Limits(requests_per_minute=60))
    assert second == Tenant(key_id=digest(OTHER)[:KEY_ID_LENGTH], user_id=None, models=None,
                            limits=Limits(requests_per_minute=60))
    assert first.scope == f"key:{first.key_id}" and first.scope != second.scope
    assert keys.authenticate(head(api_key(KEY))) is first  # made once, when the ring is built


@pytest.mark.parametrize(("per_key", "override", "limits"), [
    ({}, None, Limits()),
    ({"requests_per_minute": 60}, None, Limits(requests_per_minute=60)),
    ({"requests_per_minute": 60, "max_concurrent": 2}, {"max_concurrent": 9},
     Limits(requests_per_minute=60, max_concurrent=9)),
    ({"requests_per_minute": 60}, {"tokens_per_minute": 1000, "burst": 3},
     Limits(requests_per_minute=60, burst=3, tokens_per_minute=1000)),
    ({"budget": {"usd": 5, "per": "month"}}, {"budget": {"tokens": 100, "per": "day"}},
     Limits(budget_tokens=100, budget_period="day")),
    ({}, {"requests_per_minute": 6}, Limits(requests_per_minute=6)),
])
def test_a_tenants_limits_are_per_key_then_its_overrides(per_key: dict, override: dict | None, limits: Limits):
    key: dict[str, Any] = {"key": KEY}
    if override is not None:
        key["rate_limit"] = override
    cfg = config(auth={"enabled": True, "keys": [key]}, rate_limit={"enabled": True, "per_key": per_key})
    assert KeyRing(cfg.auth, cfg.rate_limit).authenticate(head(bearer(KEY))).limits == limits


def tenant(models: set[str] | None) -> Tenant:
    return Tenant(key_id="k", user_id=None, models=None if models is None else frozenset(models), limits=Limits())


@pytest.mark.parametrize(("models", "asked"), [
    (None, ("anything",)),
    (None, (None,)),
    (None, ()),
    ({"a", "b"}, ("a",)),
    ({"a", "b"}, ("b",)),
    ({"a", "b"}, ("alias", "a")),  # the requested name is an alias of an allowed model
    ({"a", "b"}, (None, "a")),
    ({"a", "b"}, ("a", None)),
])
def test_a_tenant_may_use_a_model_it_is_allowed_by_any_name(models: set[str] | None, asked: tuple):
    assert tenant(models).may_use(*asked)


@pytest.mark.parametrize(("models", "asked"), [
    ({"a", "b"}, ("c",)),
    ({"a", "b"}, ("c", "d")),
    ({"a", "b"}, (None,)),  # no model named: nothing to allow
    ({"a", "b"}, ()),
    ({"a", "b"}, ("A",)),  # model names are exact
    ({"a", "b"}, ("a:latest",)),
    (set(), ("a",)),  # models: [] allows nothing
    (set(), (None,)),
])
def test_a_tenant_may_not_use_a_model_outside_its_list(models: set[str], asked: tuple):
    assert not tenant(models).may_use(*asked)
