"""Who may call whom: the ``--allow CALLER->CALLEE`` rules and the policy they give each service.

DESIGN.md, "Identity": authorization is pushed with the routes, kept with the
last-known-good table, and enforced by the callee's sidecars on their inbound listener,
against the caller's verified certificate. The control plane only states it:

- no rule at all: nothing is enforced (``Authorization(enforced=False)`` everywhere), as
  before identities existed;
- at least one rule: every service is deny-by-default. A service's policy carries
  ``enforced=True`` and the callers that rules name for it, sorted; a service no rule
  names as callee gets ``enforced=True`` with no callers (nobody may call it). That
  includes services that register later: an operator who starts writing rules has to
  write one for every call the mesh makes, and a forgotten one fails closed.

Pure: parsing and deciding only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from controlplane.model import DNS_LABEL, Authorization

ARROW = "->"


class RuleError(ValueError):
    """An ``--allow`` value that is not CALLER->CALLEE with two service names."""


@dataclass(frozen=True, slots=True)
class AuthorizationRules:
    """(caller, callee) pairs, sorted and unique; empty: nothing enforced."""

    rules: tuple[tuple[str, str], ...] = ()

    @property
    def enforced(self) -> bool:
        return bool(self.rules)

    def for_service(self, callee: str) -> Authorization:
        """The authorization pushed with ``callee``'s policy."""
        if not self.rules:
            return Authorization()
        return Authorization(enforced=True, allowed_callers=tuple(sorted({a for a, b in self.rules if b == callee})))

    def texts(self) -> list[str]:
        """The rules as written: ``["song->artist", ...]``."""
        return [f"{a}{ARROW}{b}" for a, b in self.rules]

    def as_json(self) -> dict[str, object]:
        return {"enforced": self.enforced, "rules": self.texts()}


def parse_allow(values: Iterable[str]) -> AuthorizationRules:
    """``["song->artist,song->image", "artist->image"]`` -> rules; RuleError says what is wrong."""
    pairs: set[tuple[str, str]] = set()
    for value in values:
        for item in filter(None, (part.strip() for part in value.split(","))):
            pairs.add(parse_rule(item))
    return AuthorizationRules(tuple(sorted(pairs)))


def parse_rule(text: str) -> tuple[str, str]:
    caller, arrow, callee = text.partition(ARROW)
    caller, callee = caller.strip(), callee.strip()
    if not arrow:
        raise RuleError(f"--allow {text!r}: expected CALLER->CALLEE, e.g. song->artist "
                        "(quote it in a shell: '>' redirects)")
    for name in (caller, callee):
        if not DNS_LABEL.match(name):
            raise RuleError(f"--allow {text!r}: {name!r} is not a service name (a DNS label: a-z, 0-9, '-')")
    return caller, callee
