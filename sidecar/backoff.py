"""Exponential backoff with full jitter for reconnecting the discovery stream.

delay(n) = uniform(0, min(cap, base * multiplier**n))  -- "full jitter" (AWS architecture
blog, "Exponential Backoff And Jitter"), so a restarted control plane is not hit by every
sidecar at once. It resets when a message arrives on the stream, not when a connection
opens: a control plane that accepts and then fails must still be backed off from.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    base_s: float = 0.05
    cap_s: float = 0.5
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not (0 < self.base_s <= self.cap_s):
            raise ValueError(f"backoff needs 0 < base ({self.base_s}) <= cap ({self.cap_s})")
        if self.multiplier < 1:
            raise ValueError(f"backoff multiplier must be >= 1, got {self.multiplier}")


class ExpBackoff:
    def __init__(self, policy: BackoffPolicy, *, rng: Callable[[], float] = random.random) -> None:
        self.policy = policy
        self._rng = rng
        self.failures = 0

    def next_delay(self) -> float:
        ceiling = min(self.policy.cap_s, self.policy.base_s * self.policy.multiplier**self.failures)
        self.failures += 1
        return self._rng() * ceiling

    def reset(self) -> None:
        self.failures = 0

    @property
    def persistent(self) -> bool:
        """Failing long enough to warn about rather than log at debug."""
        return self.failures >= 5
