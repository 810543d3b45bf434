"""``sidemesh identity init``: a mesh's certificate authority and one join token per service.

The control plane signs workload certificates with the CA and checks the join token a sidecar
presents on first contact (DESIGN.md, "Identity"). ``sidemesh up`` prepares both itself; a
deployment that runs the pieces apart (compose, your own) runs this once, before the control
plane starts::

    sidemesh identity init --ca-dir /identity/ca --services artist,song,image \\
        --export artist=/identity/artist --export song=/identity/song ...

writes ``ca.pem`` and ``ca-key.pem`` (mode 0600) and ``tokens/<service>`` (0600) into
``--ca-dir`` -- the control plane's ``--ca-dir`` and ``--join-tokens`` -- and, for each
``--export``, that service's ``token`` and the public ``ca.pem`` into a directory of its own,
which only that service's sidecars mount. Existing files are kept, so running it again changes
nothing.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from identity.spiffe import DEFAULT_TRUST_DOMAIN, IdentityError, SpiffeId
from identity.store import CA_CERT_FILE, ensure_tokens, load_or_create_ca, write_atomic


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sidemesh identity", description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = p.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", prog="sidemesh identity init",
                          description="Create the mesh CA and a join token per service (kept if present).")
    init.add_argument("--ca-dir", required=True, help="where the CA (ca.pem, ca-key.pem) and tokens/<service> go")
    init.add_argument("--services", required=True, help="comma-separated service names, e.g. artist,song,image")
    init.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN, help="SPIFFE trust domain (default %(default)s)")
    init.add_argument("--export", action="append", default=[], metavar="SERVICE=DIR",
                      help="also write SERVICE's token and the CA certificate into DIR (repeatable)")
    return p


def init(ca_dir: Path, services: list[str], trust_domain: str, exports: dict[str, Path]) -> list[str]:
    """Do the work; return one line per file made or found."""
    ca = load_or_create_ca(ca_dir, trust_domain, time.time())
    tokens = ensure_tokens(ca_dir / "tokens", services)
    lines = [f"CA {ca_dir / CA_CERT_FILE} (trust domain {ca.trust_domain})"]
    lines += [f"token for {s}: {p}" for s, p in tokens.items()]
    for service, target in exports.items():
        target.mkdir(parents=True, exist_ok=True)
        write_atomic(target / "token", tokens[service].read_bytes(), private=True)
        shutil.copyfile(ca_dir / CA_CERT_FILE, target / CA_CERT_FILE)
        lines.append(f"exported {service}: {target}/token, {target}/{CA_CERT_FILE}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = _parser()
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    services = [s.strip() for s in a.services.split(",") if s.strip()]
    exports: dict[str, Path] = {}
    try:
        for s in services:
            SpiffeId(a.trust_domain, s)
        for item in a.export:
            service, sep, path = item.partition("=")
            if not sep or service not in services or not path:
                p.error(f"--export {item!r}: expected SERVICE=DIR with SERVICE one of {', '.join(services)}")
            exports[service] = Path(path)
    except IdentityError as exc:
        p.error(str(exc))
    try:
        for line in init(Path(a.ca_dir), services, a.trust_domain, exports):
            print(line)
    except (OSError, IdentityError) as exc:
        print(f"sidemesh identity init: {exc}", file=sys.stderr)
        return 1
    return 0
