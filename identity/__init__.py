"""Workload identity shared by the control plane and the sidecar: SPIFFE-style IDs (``spiffe``),
keys, CSRs and the certificate authority (``certs``, on ``cryptography``), files on disk
(``store``), TLS contexts and the peer check (``tls``, the standard ``ssl`` module) and join tokens.
Imports nothing else of ours (DESIGN.md, "Who may import whom"). Import the submodule you need:
``identity.spiffe`` and ``identity.tls`` stay light; ``cryptography`` loads with ``certs``/``store``.
"""
