"""Who may change the DNS server's records and the ``sidemesh up`` control API.

``PUT /records`` repoints every service of the mesh zone, and ``POST /scale``,
``/kill``, ``/stop`` and ``/start`` run or end processes, so they get the control
plane's admin policy (``controlplane/adminauth.py``): served only to a peer in the
allowed networks (default loopback) or to a request carrying the admin token.
``sidemesh up`` runs every component on 127.x addresses, so with the default it needs
no token. The clients (``sidemesh.ctl``) send ``$SIDEMESH_ADMIN_TOKEN`` when it is set
(``client_headers``).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

from controlplane.adminauth import (
    DEFAULT_ADMIN_ALLOW,
    ENV_ADMIN_ALLOW,
    ENV_ADMIN_TOKEN,
    ENV_ADMIN_TOKEN_FILE,
    READ_ONLY_METHODS,
    AdminPolicy,
    add_admin_arguments,
    admin_middleware,
    parse_networks,
    policy_from_args,
    read_token_file,
)

__all__ = [
    "DEFAULT_ADMIN_ALLOW",
    "ENV_ADMIN_ALLOW",
    "ENV_ADMIN_TOKEN",
    "ENV_ADMIN_TOKEN_FILE",
    "READ_ONLY_METHODS",
    "AdminPolicy",
    "add_admin_arguments",
    "admin_middleware",
    "client_headers",
    "parse_networks",
    "policy_from_args",
    "policy_from_env",
    "read_token_file",
]


def policy_from_env(env: Mapping[str, str]) -> AdminPolicy:
    """The policy a server without flags of its own uses: ``$SIDEMESH_ADMIN_ALLOW`` and the token env vars."""
    args = argparse.Namespace(admin_allow=env.get(ENV_ADMIN_ALLOW, DEFAULT_ADMIN_ALLOW), admin_token=None,
                              admin_token_file=env.get(ENV_ADMIN_TOKEN_FILE))
    return policy_from_args(args, env)


def client_headers(env: Mapping[str, str]) -> dict[str, str]:
    """What a client sends: ``Authorization: Bearer $SIDEMESH_ADMIN_TOKEN`` when that is set."""
    token = env.get(ENV_ADMIN_TOKEN, "").strip()
    return {"Authorization": f"Bearer {token}"} if token else {}
