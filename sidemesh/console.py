"""What ``sidemesh up`` shows on the console: the mesh table and the notable lines of child logs.

Children write straight to their own log files (no pipe through us, so a busy
sidecar never waits on the supervisor). A tailer reads what was appended, a few
times a second in a worker thread, and echoes only the lines a person watching a
drill cares about: mode changes, rejected/guarded updates, warnings and errors,
tracebacks. ``--console all`` echoes everything, ``none`` nothing.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO

NOTABLE = re.compile(
    r"event=(mode_change|\w*reject\w*|\w*guard\w*|\w*nack\w*|\w*fault\w*)"
    r"|level=(WARNING|ERROR|CRITICAL)|^Traceback|^\w+(Error|Exception)\b"
)
# '2026-11-24 14:39:51,332 level=WARNING component=sidecar instance=artist-1 ' -> '14:39:51.332 WARNING '
_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d (\d\d:\d\d:\d\d),(\d{3}) level=(\w+) component=\S+(?: instance=\S+)? ")
TAIL_INTERVAL_S = 0.25
MAX_READ = 1 << 20


def is_notable(line: str) -> bool:
    """True for the log lines worth a console line during a drill."""
    return NOTABLE.search(line) is not None


def compact(line: str) -> str:
    """A child's log line for the console: time and level kept, date and component dropped (the prefix says it)."""
    return _PREFIX.sub(r"\1.\2 \3 ", line, count=1)


def mesh_table(pods: Iterable[Mapping[str, Any]]) -> str:
    """The 'what is where' table: name, address, ports, pids, state."""
    rows = [("NAME", "ADDRESS", "PORTS", "PID", "STATE")]
    for p in pods:
        ports = " ".join(f"{k}:{v}" for k, v in p["ports"].items())
        if p["kind"] == "pod":
            pid = f"app {p.get('app_pid') or '-'} sidecar {p.get('sidecar_pid') or '-'}"
        else:
            pid = str(p.get("pid") or "-")
        rows.append((p["name"], p["address"], ports, pid, p["state"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


class LogTailer:
    """Echoes notable (or all) new lines of the files ``sources()`` names, prefixed by their name."""

    def __init__(
        self,
        sources: Callable[[], Mapping[Path, str]],
        *,
        mode: str = "events",
        out: TextIO = sys.stdout,
        interval: float = TAIL_INTERVAL_S,
    ) -> None:
        self._sources = sources
        self._mode = mode
        self._out = out
        self._interval = interval
        self._offsets: dict[Path, int] = {}
        self._partial: dict[Path, str] = {}

    async def run(self) -> None:
        if self._mode == "none":
            return
        while True:
            await asyncio.sleep(self._interval)
            await self.poll()

    async def poll(self) -> None:
        """Read what was appended to every source since the last poll and echo it."""
        sources = dict(self._sources())
        chunks = await asyncio.to_thread(self._read_all, list(sources))
        for path, text in chunks:
            self._emit(sources[path], path, text)

    def _read_all(self, paths: list[Path]) -> list[tuple[Path, str]]:
        out = []
        for path in paths:
            offset = self._offsets.get(path, 0)
            try:
                with open(path, "rb") as f:
                    f.seek(0, 2)
                    size = f.tell()
                    if size < offset:
                        offset = 0
                    f.seek(offset)
                    data = f.read(min(MAX_READ, size - offset))
            except OSError:
                continue
            self._offsets[path] = offset + len(data)
            if data:
                out.append((path, data.decode(errors="replace")))
        return out

    def _emit(self, name: str, path: Path, text: str) -> None:
        text = self._partial.pop(path, "") + text
        lines = text.split("\n")
        if lines[-1]:
            self._partial[path] = lines[-1]
        for line in lines[:-1]:
            if line and (self._mode == "all" or is_notable(line)):
                print(f"[{name}] {compact(line)}", file=self._out, flush=True)
