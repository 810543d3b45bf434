"""The discovery stream client: one bidirectional gRPC stream to the control plane.

It sends the Hello (our registration; the open stream is our lease), applies every
Snapshot through the route book (the ``Subscription``), ACKs or NACKs it, and when the
stream fails, closes, or its keepalive times out, tells the route book (which switches to
DNS) and reconnects with jittered exponential backoff. grpc errors are converted to
``ControlPlaneUnavailable`` here, at the boundary.

Liveness, twice over. gRPC keepalive pings every ``keepalive_s`` and gives up
``keepalive_timeout_s`` later, so a control plane that stops answering without closing
(SIGSTOP, a partition) is noticed in a few seconds. That proves the connection, not the
stream: a stream whose handler ended or hung on a live connection would look healthy
forever. So once the stream has been quiet for ``ping_interval_s`` we send a Ping and
expect some message back within ``ping_timeout_s``; silence tears the stream down like any
other loss (DNS mode, reconnect), and ``connected`` is never true for a dead stream.

Each attempt uses a fresh channel so our own backoff, not grpc's channel-level reconnect
backoff (which grows to minutes), decides when we retry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import grpc.aio
from meshpb.v1 import discovery_pb2_grpc

from sidecar import convert
from sidecar.backoff import ExpBackoff
from sidecar.errors import ControlPlaneUnavailable, SnapshotRejected
from sidecar.model import RouteTable

log = logging.getLogger("sidemesh.sidecar.discovery")

# the control plane's serving certificate always names this host (sidecars reach it under many names)
CONTROLPLANE_SERVER_NAME = "controlplane"


class Subscription(Protocol):
    def on_config_update(self, table: RouteTable) -> None: ...
    def on_config_update_failed(self, exc: SnapshotRejected) -> None: ...
    def on_stream_lost(self, reason: str) -> None: ...
    def on_initial_fetch_timeout(self, timeout_s: float) -> None: ...
    def last_version(self) -> str: ...
    def known_instances(self) -> tuple[str, ...]: ...
    def known_endpoints(self) -> tuple[tuple[str, str, int], ...]: ...


@dataclass(frozen=True, slots=True)
class Identity:
    node_id: str
    service: str
    address: str
    port: int
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class StreamSettings:
    initial_fetch_timeout_s: float = 2.0
    first_message_timeout_s: float = 5.0
    keepalive_s: float = 1.0
    keepalive_timeout_s: float = 1.5
    ping_interval_s: float = 10.0
    ping_timeout_s: float = 5.0
    # the control plane keeps its snapshots under the gRPC default; say it explicitly
    max_receive_bytes: int = 4 * 1024 * 1024

    def channel_options(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.keepalive_time_ms", int(self.keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_s * 1000)),
            # newer gRPC cores time keepalive pings out with this (default 60 s), not the above
            ("grpc.http2.ping_timeout_ms", int(self.keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            # without this, pings after the first are throttled to one per 5 minutes while the
            # control plane sends no data (it only pushes on change), and a frozen peer goes unnoticed
            ("grpc.http2.min_time_between_pings_ms", int(self.keepalive_s * 1000)),
            ("grpc.http2.min_ping_interval_without_data_ms", int(self.keepalive_s * 1000)),
            # bounds how long connecting to a hung peer may take before the call fails
            ("grpc.min_reconnect_backoff_ms", 2000),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
            ("grpc.enable_retries", 0),
            ("grpc.max_receive_message_length", self.max_receive_bytes),
        ]


class DiscoveryClient:
    def __init__(
        self,
        target: str,
        identity: Identity,
        subscription: Subscription,
        *,
        backoff: ExpBackoff,
        settings: StreamSettings = StreamSettings(),
        credentials: Callable[[], Awaitable[grpc.ChannelCredentials]] | None = None,
    ) -> None:
        self.target = target
        self.identity = identity
        self.sub = subscription
        self.backoff = backoff
        self.settings = settings
        # None: plaintext (--insecure); else mutual TLS with the current workload certificate,
        # fetched per attempt so a renewed certificate is used by the next connection
        self._credentials = credentials
        self.connected = False
        self.last_error: str | None = None
        self.attempts = 0

    async def run(self) -> None:
        """Run until cancelled: stream, and on loss reconnect with backoff."""
        loop = asyncio.get_running_loop()
        timer = loop.call_later(
            self.settings.initial_fetch_timeout_s, self.sub.on_initial_fetch_timeout, self.settings.initial_fetch_timeout_s
        )
        try:
            while True:
                try:
                    await self._stream_once()
                except ControlPlaneUnavailable as exc:
                    reason = str(exc)
                self.connected = False
                self.last_error = reason
                self.sub.on_stream_lost(reason)
                delay = self.backoff.next_delay()
                level = logging.WARNING if self.backoff.persistent and self.backoff.failures % 20 == 5 else logging.DEBUG
                log.log(level, "event=controlplane_retry target=%s in_s=%.3f failures=%d reason=%r",
                        self.target, delay, self.backoff.failures, reason)
                await asyncio.sleep(delay)
        finally:
            timer.cancel()

    async def _stream_once(self) -> None:
        self.attempts += 1
        options = self.settings.channel_options()
        if self._credentials is None:
            channel = grpc.aio.insecure_channel(self.target, options=options)
        else:
            creds = await self._credentials()  # raises ControlPlaneUnavailable without a certificate
            options.append(("grpc.ssl_target_name_override", CONTROLPLANE_SERVER_NAME))
            channel = grpc.aio.secure_channel(self.target, creds, options=options)
        call = None
        reading: asyncio.Future[Any] | None = None
        try:
            stub = discovery_pb2_grpc.DiscoveryStub(channel)
            call = stub.Stream()
            ident = self.identity
            await call.write(
                convert.hello(
                    node_id=ident.node_id,
                    service=ident.service,
                    address=ident.address,
                    port=ident.port,
                    labels=dict(ident.labels),
                    last_version=self.sub.last_version(),
                    known_instances=self.sub.known_instances(),
                    known_endpoints=self.sub.known_endpoints(),
                )
            )
            s = self.settings
            wait_s, silence = s.first_message_timeout_s, f"no snapshot within {s.first_message_timeout_s:g}s of connecting"
            seq, pinged = 0, False
            while True:
                # one read in flight at a time; it survives our timeouts (cancelling a grpc.aio
                # read would cancel the call), so a ping can go out while it waits
                reading = reading or asyncio.ensure_future(call.read())
                done, _ = await asyncio.wait({reading}, timeout=wait_s)
                if not done:
                    if not self.connected or pinged:
                        raise ControlPlaneUnavailable(silence)
                    seq, pinged = seq + 1, True
                    await call.write(convert.ping(seq))
                    wait_s, silence = s.ping_timeout_s, f"stream silent: no answer to ping {seq} within {s.ping_timeout_s:g}s"
                    continue
                msg = reading.result()
                reading = None
                if msg is grpc.aio.EOF:
                    raise ControlPlaneUnavailable("stream closed by the control plane")
                # any message proves the stream alive
                self.backoff.reset()
                wait_s, pinged = s.ping_interval_s, False
                if convert.is_pong(msg):
                    continue
                if not self.connected:
                    self.connected = True
                    log.info("event=controlplane_connected target=%s", self.target)
                await call.write(self._apply(msg))
        except grpc.aio.AioRpcError as exc:
            raise ControlPlaneUnavailable(f"{exc.code().name}: {exc.details()}") from exc
        except (grpc.aio.UsageError, grpc.RpcError) as exc:
            raise ControlPlaneUnavailable(f"stream error: {exc}") from exc
        finally:
            self.connected = False
            if reading is not None and not reading.done():
                reading.cancel()
            if call is not None:
                call.cancel()
            await channel.close(grace=None)

    def _apply(self, msg: convert.Snapshot) -> convert.DiscoveryRequest:
        try:
            table = convert.table_from_snapshot(msg)
            self.sub.on_config_update(table)
        except SnapshotRejected as exc:
            self.sub.on_config_update_failed(exc)
            return convert.nack(msg.version, msg.nonce, exc.reason)
        return convert.ack(msg.version, msg.nonce)
