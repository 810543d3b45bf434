"""Endpoint picking: round robin or least-request (power of two choices), skipping ejected
endpoints. Pure decisions; the proxy tells ``EndpointHealth`` what happened.

Passive health: an endpoint that refused a connection is ejected for ``eject_s`` seconds
(Envoy's outlier detection, much simplified). When every endpoint is ejected we pick among
all of them anyway ("panic mode"), since failing for sure is worse than trying.

A retry passes the endpoints its exchange already tried as ``exclude``: they are skipped
like ejected ones, and picked again only when every endpoint of the route was tried.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection

from sidecar.model import LB_LEAST_REQUEST, DEFAULT_POLICY, Endpoint, Policy, Source

Key = tuple[str, int]


class EndpointHealth:
    """Ejections and in-flight counts, shared by every route of one sidecar."""

    def __init__(self, *, eject_s: float = 3.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.eject_s = eject_s
        self._clock = clock
        self.ejected: dict[Key, float] = {}
        self.active: dict[Key, int] = {}

    def eject(self, key: Key) -> None:
        self.ejected[key] = self._clock() + self.eject_s

    def is_ejected(self, key: Key) -> bool:
        until = self.ejected.get(key)
        if until is None:
            return False
        if until <= self._clock():
            del self.ejected[key]
            return False
        return True

    def started(self, key: Key) -> None:
        self.active[key] = self.active.get(key, 0) + 1

    def finished(self, key: Key) -> None:
        n = self.active.get(key, 0) - 1
        if n > 0:
            self.active[key] = n
        else:
            self.active.pop(key, None)


class ResolvedRoute:
    """Where calls to one service go right now, and how to pick among the endpoints."""

    __slots__ = ("service", "endpoints", "source", "policy", "_next", "_health", "_rand")

    def __init__(
        self,
        service: str,
        endpoints: tuple[Endpoint, ...],
        source: Source,
        health: EndpointHealth,
        policy: Policy = DEFAULT_POLICY,
        *,
        rand: Callable[[int], int] | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError(f"route for {service} needs at least one endpoint")
        self.service = service
        self.endpoints = endpoints
        self.source = source
        self.policy = policy
        self._health = health
        self._rand = rand or (lambda n: random.randrange(n))
        self._next = self._rand(len(endpoints))  # do not send every sidecar's first call to endpoint 0

    def pick(self, exclude: Collection[Endpoint] | Endpoint | None = ()) -> Endpoint:
        """The next endpoint, skipping ejected ones and those in ``exclude`` (already tried)."""
        if exclude is None:
            exclude = ()
        elif isinstance(exclude, Endpoint):
            exclude = (exclude,)
        if self.policy.lb == LB_LEAST_REQUEST:
            return self._least_request(exclude)
        return self._round_robin(exclude)

    def _round_robin(self, exclude: Collection[Endpoint]) -> Endpoint:
        eps = self.endpoints
        n = len(eps)
        health = self._health
        check = bool(health.ejected) or bool(exclude)
        for _ in range(n):
            ep = eps[self._next % n]
            self._next += 1
            if not check or (ep not in exclude and not health.is_ejected(ep.key)):
                return ep
        return self._panic(exclude)

    def _least_request(self, exclude: Collection[Endpoint]) -> Endpoint:
        candidates = [ep for ep in self.endpoints if ep not in exclude and not self._health.is_ejected(ep.key)]
        if not candidates:
            return self._panic(exclude)
        if len(candidates) == 1:
            return candidates[0]
        a = candidates[self._rand(len(candidates))]
        b = candidates[self._rand(len(candidates))]
        active = self._health.active
        return a if active.get(a.key, 0) <= active.get(b.key, 0) else b

    def _panic(self, exclude: Collection[Endpoint]) -> Endpoint:
        # ejected endpoints not yet tried, else (every endpoint tried) any of them
        others = [ep for ep in self.endpoints if ep not in exclude] or list(self.endpoints)
        ep = others[self._next % len(others)]
        self._next += 1
        return ep
