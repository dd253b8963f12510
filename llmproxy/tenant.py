"""Who is calling, as the request path sees it: an identity with the models and limits it may use.

An API key makes one (auth.py), and so does a verified tenant JWT (jwtauth.py); whatever authenticates a
caller hands on the same thing, so limits, budgets, model allow-lists, address rules, own backend
credentials and records treat every kind of caller alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmproxy.byok import BackendKeys
from llmproxy.iprules import IpList
from llmproxy.ratelimit import limits_for
from llmproxy.ratelimit.store import Limits

if TYPE_CHECKING:
    from llmproxy.config.model import ApiKeyConfig, JwtTenantConfig, LimitConfig


@dataclass(frozen=True, slots=True)
class Tenant:
    key_id: str  # names the caller in logs, metrics and records; never a secret
    user_id: str | None  # put on every usage record of this caller
    models: frozenset[str] | None  # the models it may use; None: any
    limits: Limits  # its own rate limits and budget (rate_limit.per_key, then its overrides)
    allowed_ips: IpList | None = None  # the client addresses it may call from; None: any
    backend_keys: BackendKeys | None = None  # its own provider credentials (BYOK); None: the backends' own

    @property
    def scope(self) -> str:
        """The rate-limit scope of this caller's counters."""
        return f"key:{self.key_id}"

    def may_use(self, *models: str | None) -> bool:
        """True if it may use a model known by any of these names (the requested one, an alias's target)."""
        allowed = self.models
        return allowed is None or any(m in allowed for m in models if m is not None)


def tenant_from(config: ApiKeyConfig | JwtTenantConfig, key_id: str, per_key: LimitConfig,
                refuse_missing: bool) -> Tenant:
    """The caller an API key (or a JWT tenant's entry, as the template of its tokens) describes: its models,
    its limits (`per_key` with its overrides), its addresses and its own backend credentials."""
    return Tenant(
        key_id=key_id,
        user_id=config.user_id,
        models=None if config.models is None else frozenset(config.models),
        limits=limits_for(per_key, config.rate_limit),
        allowed_ips=IpList(config.allowed_ips) if config.allowed_ips else None,
        backend_keys=BackendKeys(config.backend_keys, refuse_missing) if config.backend_keys else None,
    )
