"""Which backends may serve a request: by model (after aliases) and by the kinds of server its endpoint needs.

A backend serves the models of its `models:` list or, without one, the ones it reports; a backend whose
list is not known yet may serve anything. Of the backends that can serve a request, those available
(healthy, not ejected) are the candidates; if none is, all of them are: a fresh failure, retried
elsewhere, beats a certain 503 when every backend looks down (probes can be wrong; a restart can be quick).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmproxy.catalogue import TRANSLATIONS
from llmproxy.errors import ProxyError

if TYPE_CHECKING:
    from llmproxy.catalogue import Endpoint
    from llmproxy.fleet.backend import Backend

class Router:
    def __init__(self, backends: list[Backend], aliases: dict[str, str]) -> None:
        self.backends = backends
        self.aliases = aliases

    def resolve_model(self, requested: str | None) -> str | None:
        """The model name to forward: an alias's target, else the name as requested."""
        if requested is None:
            return None
        return self.aliases.get(requested, requested)

    def candidates(self, endpoint: Endpoint, path: str, model: str | None, now: float,
                   translate: str = "when_needed", among: list[Backend] | None = None) -> list[Backend]:
        """The backends to balance a request for `path` over; raises ProxyError if none can serve it.

        `endpoint` is the path's catalogue row (which kinds serve it); `model` is the resolved name (after
        aliases); `now` is loop time; `translate` is routing.translate. Backends that serve the endpoint's API
        natively come first: those that serve it only through a translation are candidates when none of the
        former serves the model, or none of those is available (always: as well; never: not at all).
        `among`: the backends to judge (a route's upstreams), by the same rules; default all of them.
        """
        backends = self.backends if among is None else among
        native = [b for b in backends if b.serves_endpoint(endpoint)]
        able = native if model is None else [b for b in native if b.serves(model)]
        translated: list[Backend] | None = None  # looked for only when needed
        if not able or translate == "always":
            reachable = self._translatable(backends, endpoint, native, translate)
            if not native and not reachable:
                if not backends:  # only discovery entries, none of which has found a backend (yet)
                    raise ProxyError("no_backends", "no backend is available: discovery has found none")
                raise ProxyError("path_not_served", f"no backend of this proxy serves {path}")
            translated = reachable if model is None else [b for b in reachable if b.serves(model)]
            able = able + translated
        if not able:
            raise ProxyError("model_not_found", f"The model `{model}` does not exist.")
        available = [b for b in able if b.available(now)]
        if not available and translated is None:
            # Every native one is down: a translation to one that is up beats a failure almost certain.
            available = [b for b in self._translatable(backends, endpoint, native, translate)
                         if b.available(now) and (model is None or b.serves(model))]
        return available or able

    @staticmethod
    def _translatable(backends: list[Backend], endpoint: Endpoint, native: list[Backend],
                      translate: str) -> list[Backend]:
        """Of `backends`, those that serve the endpoint's API only through a translation (none under `never`)."""
        targets = TRANSLATIONS.get(endpoint.family or "", ()) if translate != "never" else ()
        if not targets:
            return []
        return [b for b in backends if b not in native and any(target in b.apis for target in targets)]

    def model_cards(self, now: float) -> list[dict]:
        """/v1/models: every model of the available backends (all backends if none is), then aliases."""
        backends = [b for b in self.backends if b.available(now)] or self.backends
        cards: dict[str, dict] = {}
        for backend in backends:
            for card in backend.model_cards:
                cards.setdefault(card["id"], card)
        for alias, target in self.aliases.items():
            if alias not in cards and target in cards:
                # The target's card under the alias's name: clients read max_model_len etc. from it.
                cards[alias] = {**cards[target], "id": alias, "root": target, "parent": target}
        return list(cards.values())

    def model_card(self, model_id: str, now: float) -> dict:
        """/v1/models/{id}; raises ProxyError (404) for a model no backend serves."""
        for card in self.model_cards(now):
            if card["id"] == model_id:
                return card
        raise ProxyError("model_not_found", f"The model `{model_id}` does not exist.")
