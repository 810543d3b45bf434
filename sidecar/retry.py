"""Whether a failed attempt of an exchange is tried again: one pure rule, no I/O.

The proxy (``sidecar/proxy.py``) classifies what went wrong and asks ``should_retry``;
the answer depends only on the arguments.

The rule, in order:

1. Never when the request cannot be sent again: part of it already went out and we no
   longer hold all of it (a body beyond the replay buffer, or one still streaming).
2. ``CONNECT`` and ``APP_UNAVAILABLE`` reached no application: no connection was made, or
   the far sidecar answered that its app refused the connection. Any method goes to
   another endpoint: up to the route policy's retries, or each endpoint once. Walking the
   endpoints is bounded by ``MAX_WALK``, not by ``MAX_ATTEMPTS``: after a scale-down during
   an outage a DNS answer may still hold several replicas that are gone, and the one live
   replica must be reached however many dead ones are tried first.
3. Every other failure may have reached the application, so only idempotent methods are
   retried (RFC 9110 9.2.2; RFC 9112 9.3.1: a user agent MUST NOT automatically retry a
   non-idempotent request unless it knows the original was never applied).
4. Up to the route policy's ``retries``, any such failure is retried.
5. Beyond them, ``DEAD_POOLED`` is retried across endpoints, each endpoint once (up to
   ``MAX_WALK``): a reused
   keep-alive connection closed before a single response byte, the race RFC 9112 9.3.1
   describes (the server closed an idle connection as we wrote; a pod draining for shutdown
   closes all of them). On a one-endpoint route it is tried once more on that endpoint.
6. ``RESET`` (the connection died after response bytes, or on a fresh connection) is not
   retried beyond the policy: the application may have acted on it.

The caller excludes every endpoint the exchange already tried when it picks the next one
(``ResolvedRoute.pick``), and falls back to any endpoint only when all were tried.
"""

from __future__ import annotations

import enum

MAX_ATTEMPTS = 3  # attempts the route policy's retries may use, whatever they say
MAX_WALK = 8  # attempts when walking endpoints after failures that reached no application


class Failure(enum.Enum):
    CONNECT = "connect"  # refused, unreachable, connect timeout; mTLS: no handshake, or not the service routed to
    APP_UNAVAILABLE = "app_unavailable"  # the far sidecar's app refused the connection (503 + header)
    DEAD_POOLED = "dead_pooled"  # a reused connection closed before any response byte
    RESET = "reset"  # the connection died before a whole response head, anything else


def should_retry(
    failure: Failure,
    *,
    attempts: int,
    endpoints: int,
    policy_retries: int,
    idempotent: bool,
    can_resend: bool,
    max_attempts: int = MAX_ATTEMPTS,
) -> bool:
    """True when an exchange whose attempt number ``attempts`` failed with ``failure`` goes on.

    ``endpoints`` is how many the route has; ``can_resend`` that the whole request can be
    written again (nothing sent yet, or a complete request kept for replay).
    """
    if not can_resend:
        return False
    within_policy = attempts <= policy_retries and attempts < max_attempts
    walking = attempts < min(endpoints, MAX_WALK)  # another endpoint not tried yet
    if failure is Failure.CONNECT or failure is Failure.APP_UNAVAILABLE:
        return within_policy or walking
    if not idempotent:
        return False
    if within_policy:
        return True
    if failure is Failure.DEAD_POOLED:
        return walking or attempts == 1
    return False
