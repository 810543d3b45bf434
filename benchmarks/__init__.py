"""Benchmarks of sidemesh (issue 5), run from the repository root.

- ``python -m benchmarks.dataplane``: direct vs. sidemesh vs. Envoy on the two-hop
  path, plaintext and with mutual TLS on the A -> B hop (throughput at saturation,
  latency at a fixed rate, CPU per 10k requests, peak RSS, the handshake cost at B),
  ending with the line ``sidemesh/envoy throughput=X.XX p99=Y.YY; sidemesh/envoy
  mtls throughput=X.XX p99=Y.YY handshakes=Z.ZZ``.
- ``python -m benchmarks.memory``: a sidecar's idle RSS and its RSS under load
  over time (flat or growing).
- ``python -m benchmarks.controlplane``: N simulated sidecars on one control
  plane; time from a registry change to the last ACK, CPU and RSS.

Everything runs on loopback addresses, as child processes that are stopped when
the benchmark ends (also on Ctrl-C). See ``benchmarks/README.md``.
"""
