"""The control-plane benchmark of issue 5: N simulated sidecars on one control plane.

    python -m benchmarks.controlplane --sidecars 100,1000 [--check]

For each N: a fresh ``sidemesh controlplane`` process; ``--load-procs`` load
processes (``benchmarks.meshload``) open N gRPC streams between them (one
connection each), Hello, and ACK every Snapshot. Once the control plane's
/status shows all N synced on one version, every stream remembers its version
("mark"), then one more stream joins: that is the registry change. The load
processes time (wall clock) from just before the joiner's Hello to the moment
the last of the N streams ACKed a newer snapshot. The control plane's CPU
(/proc utime+stime) is read for the connect phase and for the change, its RSS
(VmRSS) while holding N streams and its peak (VmHWM).

Goals (issue 5, checked with ``--check``, for N >= 1000): the change is ACKed by
all within 500 ms; the control plane holds the streams in < 500 MB RSS.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.procs import BenchError, Child, Children, cpu_seconds, exit_on_sigterm, http_get, memory_mb, run_main
from benchmarks.servers import CP_GRPC_PORT, CP_HTTP_PORT, REPO, start_controlplane

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "controlplane.json"
GOAL_ACK_MS = 500.0
GOAL_RSS_MB = 500.0
GOAL_MIN_SIDECARS = 1000
PHASE_TIMEOUT_S = 180.0
JOINER = "bench-joiner"  # node id of the stream whose arrival is the registry change


class LineReader:
    """JSON lines from a load process's stdout, read by a thread into a queue."""

    def __init__(self, child: Child) -> None:
        self.child = child
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.child.popen.stdout is not None
        for line in self.child.popen.stdout:
            try:
                self.lines.put(json.loads(line))
            except json.JSONDecodeError:
                continue

    def expect(self, event: str, timeout: float = PHASE_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.lines.get(timeout=0.2)
            except queue.Empty:
                if not self.child.alive:
                    raise BenchError(f"{self.child.name} exited {self.child.popen.returncode}:\n"
                                     f"{self.child.log_tail()}") from None
                if time.monotonic() > deadline:
                    raise BenchError(f"{self.child.name}: no {event!r} after {timeout:.0f}s") from None
                continue
            if msg.get("event") == "error":
                raise BenchError(f"{self.child.name}: {msg.get('reason')}")
            if msg.get("event") == event:
                return msg

    def send(self, line: str) -> None:
        assert self.child.popen.stdin is not None
        self.child.popen.stdin.write(line + "\n")
        self.child.popen.stdin.flush()


def split(n: int, parts: int) -> list[int]:
    """n streams over ``parts`` processes, as evenly as possible (no empty part)."""
    parts = max(1, min(parts, n))
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def all_synced(status: dict[str, Any], n: int) -> str | None:
    """The common version when /status shows ``n`` sidecars all synced on it, else None."""
    sidecars = status.get("sidecars") or []
    if len(sidecars) != n or not all(s.get("synced") for s in sidecars):
        return None
    versions = {s.get("acked_version") for s in sidecars}
    return status.get("version") if versions == {status.get("version")} else None


def wait_status_synced(url: str, n: int, timeout: float) -> tuple[str, float]:
    """Poll /status until ``n`` sidecars are synced on the current version; (version, seconds)."""
    started = time.monotonic()
    last: object = None
    while time.monotonic() - started < timeout:
        try:
            code, body = http_get(url, timeout=5)
            last = code
            if code == 200:
                status = json.loads(body)
                version = all_synced(status, n)
                last = f"{len(status.get('sidecars') or [])} sidecars"
                if version is not None:
                    return version, time.monotonic() - started
        except (OSError, ValueError) as exc:
            last = exc
        time.sleep(0.1)
    raise BenchError(f"/status never showed {n} sidecars synced within {timeout:.0f}s (last: {last})")


def measure(n: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One control plane, n simulated sidecars, one registry change."""
    address = args.address
    status_url = f"http://{address}:{CP_HTTP_PORT}/status"
    with Children(workdir) as children:
        cp = start_controlplane(children, address, "--log-level", "warning", "--insecure")
        cpu_start = cpu_seconds(cp.pid)
        rss_empty = memory_mb(cp.pid, "VmRSS")
        readers = []
        offset = 0
        for i, count in enumerate(split(n, args.load_procs)):
            child = children.start(f"meshload-{n}-{i}", [
                sys.executable, "-m", "benchmarks.meshload", "--target", f"{address}:{CP_GRPC_PORT}",
                "--streams", str(count), "--offset", str(offset)], cwd=REPO, pipe=True)
            readers.append(LineReader(child))
            offset += count
        started = time.monotonic()
        for r in readers:
            r.expect("connected")
        version, _ = wait_status_synced(status_url, n, PHASE_TIMEOUT_S)
        connect_s = time.monotonic() - started
        time.sleep(args.settle)
        cpu_connected = cpu_seconds(cp.pid)
        rss_holding = memory_mb(cp.pid, "VmRSS")

        for r in readers:
            r.send(f"mark {JOINER}")
        marked = [r.expect("marked") for r in readers]
        if any(m["versions"] != [version] for m in marked):
            raise BenchError(f"streams are not all on {version} before the change: {marked}")
        cpu_before = cpu_seconds(cp.pid)
        readers[0].send(f"join {JOINER}")
        t0 = readers[0].expect("joined")["t0"]
        changed = [r.expect("changed") for r in readers]
        cpu_after = cpu_seconds(cp.pid)
        _, status_s = wait_status_synced(status_url, n + 1, 30)
        result = {
            "sidecars": n,
            "load_procs": len(readers),
            "connect_s": round(connect_s, 3),
            "change_to_first_snapshot_ms": round((min(c["first_received"] for c in changed) - t0) * 1000, 1),
            "change_to_last_snapshot_ms": round((max(c["last_received"] for c in changed) - t0) * 1000, 1),
            "change_to_last_ack_ms": round((max(c["last_acked"] for c in changed) - t0) * 1000, 1),
            "change_seen_in_snapshot": all(c["saw_join"] for c in changed),
            "status_synced_after_change_s": round(status_s, 3),
            "cp_cpu_connect_s": round(cpu_connected - cpu_start, 3),
            "cp_cpu_change_s": round(cpu_after - cpu_before, 3),
            "cp_rss_empty_mb": round(rss_empty, 1),
            "cp_rss_holding_mb": round(rss_holding, 1),
            "cp_peak_rss_mb": round(memory_mb(cp.pid, "VmHWM"), 1),
        }
        for r in readers:
            r.send("quit")
    return result


def goals_met(result: dict[str, Any]) -> bool:
    """Issue 5's control-plane goals for one N (only judged for N >= 1000)."""
    if result["sidecars"] < GOAL_MIN_SIDECARS:
        return True
    return (result["change_to_last_ack_ms"] <= GOAL_ACK_MS and result["cp_peak_rss_mb"] < GOAL_RSS_MB
            and result["change_seen_in_snapshot"])


def format_table(results: list[dict[str, Any]]) -> str:
    header = (f"{'sidecars':>8} {'connect_s':>9} {'first_ms':>8} {'last_snap_ms':>12} {'last_ack_ms':>11} "
              f"{'cpu_change_s':>12} {'rss_mb':>7} {'peak_mb':>7}  goals")
    lines = [header, "-" * len(header)]
    for r in results:
        goal = "n/a" if r["sidecars"] < GOAL_MIN_SIDECARS else ("met" if goals_met(r) else "MISSED")
        lines.append(
            f"{r['sidecars']:>8} {r['connect_s']:>9.2f} {r['change_to_first_snapshot_ms']:>8.1f} "
            f"{r['change_to_last_snapshot_ms']:>12.1f} {r['change_to_last_ack_ms']:>11.1f} "
            f"{r['cp_cpu_change_s']:>12.2f} {r['cp_rss_holding_mb']:>7.1f} {r['cp_peak_rss_mb']:>7.1f}  {goal}")
    lines.append(f"goals (N >= {GOAL_MIN_SIDECARS}): last ACK <= {GOAL_ACK_MS:.0f} ms after the change, "
                 f"control plane RSS < {GOAL_RSS_MB:.0f} MB")
    return "\n".join(lines)


def parse_sidecars(text: str) -> list[int]:
    """'100,1000' -> [100, 1000]; each within 1..5000."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from exc
    if not values or any(not 1 <= v <= 5000 for v in values):
        raise argparse.ArgumentTypeError("sidecar counts must be within 1..5000")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.controlplane",
        description="N simulated sidecars (gRPC streams from separate load processes) on one control plane: "
                    "time from a registry change to the last ACK, the control plane's CPU and RSS.")
    parser.add_argument("--sidecars", type=parse_sidecars, default=[100, 1000],
                        help="comma-separated sidecar counts, one control plane each (default 100,1000)")
    parser.add_argument("--load-procs", type=int, default=2,
                        help="load processes the streams are spread over (default 2)")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds to wait after all are synced before the change (default 1)")
    parser.add_argument("--address", default="127.79.0.2",
                        help="loopback address of the control plane (default 127.79.0.2)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a goal of issue 5 is missed (1000 ACKed within 500 ms, RSS < 500 MB)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 1 <= args.load_procs <= 16:
        parser.error("--load-procs must be within 1..16")
    exit_on_sigterm()
    results = []
    with tempfile.TemporaryDirectory(prefix="sidemesh-cpbench-") as tmp:
        for n in args.sidecars:
            print(f"[{n} sidecars] connecting...", flush=True)
            try:
                result = measure(n, args, Path(tmp))
            except BenchError as exc:
                print(f"benchmark failed at {n} sidecars: {exc}", file=sys.stderr)
                return 1
            print(f"[{n} sidecars] change ACKed by all after {result['change_to_last_ack_ms']:.1f} ms", flush=True)
            results.append(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results, "goals": {
        "ack_ms": GOAL_ACK_MS, "rss_mb": GOAL_RSS_MB, "min_sidecars": GOAL_MIN_SIDECARS}}, indent=2) + "\n")
    print(f"results: {args.out}")
    print(format_table(results))
    if args.check and not all(goals_met(r) for r in results):
        return 1
    return 0


if __name__ == "__main__":
    run_main(main)
