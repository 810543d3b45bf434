"""``sidemesh inject``: Kubernetes YAML on stdin, the same with the sidecar added on stdout.

Like ``istioctl kube-inject`` and ``linkerd inject``, it is meant for pipes::

    sidemesh inject < deployment.yaml | kubectl apply -f -
    kubectl get deploy myapp -o yaml | sidemesh inject | kubectl apply -f -

Every Pod and workload with a pod template (Deployment, StatefulSet, DaemonSet, ReplicaSet,
Job, CronJob; also inside a ``kind: List``) gets the sidecar (``sidemesh.kube``); any other
object passes through unchanged, so a file with a Service and a Deployment can be piped whole.
Comments in the input are not kept (the output is written anew). Errors are one line on
stderr naming the document, and exit status 2; nothing is written then.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import yaml

from identity.spiffe import IdentityError, SpiffeId
from sidemesh.kube import (
    CA_CONFIGMAP,
    DEFAULT_CLUSTER_DOMAIN,
    DEFAULT_CONTROLPLANE,
    DEFAULT_IMAGE,
    EXTRA_INBOUND_ANNOTATION,
    JOIN_SECRET_PREFIX,
    SERVICE_LABELS,
    InjectError,
    InjectSettings,
    describe,
    inject,
    parse_hostport,
    pod_template,
)

PROG = "sidemesh inject"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Read Kubernetes YAML (one or several documents) on stdin and write it to stdout with the sidemesh "
            "sidecar added to every Pod and pod template, as a native sidecar container (Kubernetes >= 1.29): "
            "outbound :15001, inbound :15006, admin :15000 with readiness and liveness probes, HTTP_PROXY and "
            "NO_PROXY for the app containers, the join token from the Secret "
            f"{JOIN_SECRET_PREFIX}<service> (key token) and the trust bundle from the ConfigMap {CA_CONFIGMAP} "
            "(key ca.pem). Injecting twice changes nothing. Other objects pass through unchanged."
        ),
    )
    p.add_argument("--service",
                   help=f"the service the pods serve (default: the pod label {' or '.join(SERVICE_LABELS)})")
    p.add_argument("--port", type=_port, help="the app's port on the pod's loopback (default: the first containerPort "
                   "of the pod's first container)")
    p.add_argument("--image", default=DEFAULT_IMAGE, help="the sidecar's image (default %(default)s)")
    p.add_argument("--controlplane", default=DEFAULT_CONTROLPLANE,
                   help="the control plane's gRPC address HOST:PORT, or several, comma-separated, "
                   "in the order sidecars should try them (default %(default)s)")
    p.add_argument("--cluster-domain", default=DEFAULT_CLUSTER_DOMAIN,
                   help="the cluster's DNS domain; the DNS fallback looks services up as "
                   "SERVICE.<pod namespace>.svc.DOMAIN (default %(default)s)")
    p.add_argument("--extra-inbound", action="append", metavar="HOST:PORT",
                   help="also serve inbound traffic, plaintext, on HOST:PORT (a front door), repeatable "
                   f"(default: the pod annotation {EXTRA_INBOUND_ANNOTATION}, comma-separated)")
    p.add_argument("--trust-domain", help="the mesh's SPIFFE trust domain, when not the sidecar's default")
    p.add_argument("--insecure", action="store_true",
                   help="plaintext sidecars with no identity (no Secret, no ConfigMap): for comparison only")
    return p


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65535)")
    return int(text)


def settings_from_args(args: argparse.Namespace) -> InjectSettings:
    """Flags -> settings; InjectError for a value the sidecar could not use."""
    for target in args.controlplane.split(","):
        parse_hostport(target)
    for item in args.extra_inbound or ():
        parse_hostport(item)
    if args.trust_domain is not None:
        try:
            SpiffeId(args.trust_domain, "probe")
        except IdentityError as exc:
            raise InjectError(f"--trust-domain: {exc}") from exc
    if not args.image.strip():
        raise InjectError("--image is empty")
    if args.cluster_domain.strip(".") != args.cluster_domain or not args.cluster_domain:
        raise InjectError(f"--cluster-domain {args.cluster_domain!r}: give it without leading or trailing dots")
    return InjectSettings(
        image=args.image,
        controlplane=args.controlplane,
        cluster_domain=args.cluster_domain,
        service=args.service,
        app_port=args.port,
        extra_inbound=tuple(args.extra_inbound) if args.extra_inbound else None,
        trust_domain=args.trust_domain,
        insecure=args.insecure,
    )


def inject_documents(docs: Sequence[Any], settings: InjectSettings) -> tuple[list[Any], int]:
    """(documents with every workload injected, how many were); InjectError names the document."""
    out: list[Any] = []
    injected = 0
    for index, doc in enumerate(docs, start=1):
        if doc is None:
            continue  # an empty document, e.g. after a trailing '---'
        try:
            new, count = _inject_object(doc, settings)
        except InjectError as exc:
            where = describe(doc) if isinstance(doc, dict) else "?"
            raise InjectError(f"document {index} ({where}): {exc}") from exc
        out.append(new)
        injected += count
    return out, injected


def _inject_object(doc: Any, settings: InjectSettings) -> tuple[Any, int]:
    if not isinstance(doc, dict) or not doc.get("kind") or not doc.get("apiVersion"):
        raise InjectError("not a Kubernetes object (a mapping with apiVersion and kind)")
    if doc["kind"] == "List" and doc["apiVersion"] == "v1":
        items = doc.get("items") or []
        if not isinstance(items, list):
            raise InjectError("items of a List is not a list")
        results = []
        for position, item in enumerate(items):
            try:
                results.append(_inject_object(item, settings))
            except InjectError as exc:
                where = describe(item) if isinstance(item, dict) else "?"
                raise InjectError(f"item {position} ({where}): {exc}") from exc
        return {**doc, "items": [new for new, _ in results]}, sum(count for _, count in results)
    if pod_template(doc) is None:
        return doc, 0
    return inject(doc, settings), 1


def run(stdin: TextIO, stdout: TextIO, settings: InjectSettings) -> None:
    """Read, inject, write; InjectError for anything wrong (nothing written then)."""
    try:
        docs = list(yaml.safe_load_all(stdin))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InjectError(f"stdin is not YAML{where}: {problem}") from exc
    out, injected = inject_documents(docs, settings)
    if injected == 0:
        kinds = sorted({describe(d).split("/")[0] for d in out}) or ["nothing"]
        raise InjectError(f"no Pod or workload with a pod template on stdin (found: {', '.join(kinds)})")
    text = yaml.safe_dump_all(out, sort_keys=False, default_flow_style=False, width=1 << 16, allow_unicode=True)
    stdout.write(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        run(sys.stdin, sys.stdout, settings_from_args(args))
    except InjectError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    return 0
