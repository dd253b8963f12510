"""Who is calling, as the request path sees it: an identity with the models and limits it may use.

An API key makes one today (auth.py); whatever authenticates a caller later hands on the same thing, so
limits, budgets, model allow-lists and records treat every kind of caller alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmproxy.ratelimit.store import Limits


@dataclass(frozen=True, slots=True)
class Tenant:
    key_id: str  # names the caller in logs, metrics and records; never a secret
    user_id: str | None  # put on every usage record of this caller
    models: frozenset[str] | None  # the models it may use; None: any
    limits: Limits  # its own rate limits and budget (rate_limit.per_key, then its overrides)

    @property
    def scope(self) -> str:
        """The rate-limit scope of this caller's counters."""
        return f"key:{self.key_id}"

    def may_use(self, *models: str | None) -> bool:
        """True if it may use a model known by any of these names (the requested one, an alias's target)."""
        allowed = self.models
        return allowed is None or any(m in allowed for m in models if m is not None)
