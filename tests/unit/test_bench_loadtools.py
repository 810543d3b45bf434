"""The benchmark's parsing of wrk and h2load output, and its percentile maths."""

from __future__ import annotations

import pytest

from benchmarks.loadtools import (
    fixed_rate_result, h2load_command, parse_h2load_log, parse_h2load_rps, parse_wrk, percentile, wrk_command,
)
from benchmarks.procs import BenchError, parse_stat_cpu_ticks, parse_status_kb

WRK_OUTPUT = """\
Running 10s test @ http://127.77.1.1:15001/
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.11ms    1.10ms  16.80ms   80.00%
  59520 requests in 3.03s, 9.08MB read
Requests/sec:  19657.36
WRK_JSON {"requests": 59520, "duration_us": 3027874, "bytes": 9523200, "errors": {"connect": 0, "read": 1, \
"write": 0, "status": 7, "timeout": 2}, "latency_us": {"mean": 2112.3, "max": 16799, "p50": 1803, "p90": 3940, \
"p99": 7308, "p99.9": 12359}}
"""

H2LOAD_OUTPUT = """\
starting benchmark...
finished in 11.00s, 999.80 req/s, 156.22KB/s
requests: 9998 total, 9999 started, 9998 done, 9996 succeeded, 2 failed, 1 errored, 1 timeout
status codes: 9996 2xx, 0 3xx, 0 4xx, 2 5xx
"""


def test_wrk_summary_is_read_from_the_lua_json_line_in_seconds_and_milliseconds() -> None:
    result = parse_wrk(WRK_OUTPUT)
    assert result.requests == 59520
    assert result.duration_s == pytest.approx(3.027874)
    assert result.rps == pytest.approx(59520 / 3.027874)
    assert result.latency_ms["p99"] == pytest.approx(7.308)
    assert result.latency_ms["p99.9"] == pytest.approx(12.359)
    assert result.error_count == 10


def test_wrk_output_without_the_summary_line_is_an_error() -> None:
    with pytest.raises(BenchError, match="no wrk summary"):
        parse_wrk("Running 10s test @ http://x/\nRequests/sec: 1.0\n")


def test_h2load_rate_comes_from_the_finished_line_not_from_the_wall_time() -> None:
    # "finished in" includes the warm-up; the req/s figure is of the measured phase
    assert parse_h2load_rps(H2LOAD_OUTPUT) == pytest.approx(999.8)


def test_h2load_log_lines_become_status_and_latency_pairs() -> None:
    assert parse_h2load_log("1795531321765321\t200\t204\n1795531321775644\t503\t77\n\n") == [(200, 204), (503, 77)]
    with pytest.raises(BenchError, match="line 1"):
        parse_h2load_log("starting benchmark...\n")


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 1001))  # 1..1000
    assert percentile(values, 50) == 500
    assert percentile(values, 99) == 990
    assert percentile(values, 99.9) == 999
    assert percentile(values, 100) == 1000
    assert percentile([7], 99.9) == 7
    with pytest.raises(ValueError):
        percentile([], 50)


def test_fixed_rate_result_counts_failures_and_judges_whether_the_rate_was_sustained() -> None:
    log = "".join(f"{i}\t200\t{100 + i}\n" for i in range(1000))
    result = fixed_rate_result(H2LOAD_OUTPUT, log, target_rps=1000)
    assert result.requests == 1000
    assert result.latency_ms["p50"] == pytest.approx(0.599)
    assert result.latency_ms["p99"] == pytest.approx(1.089)
    assert result.latency_ms["max"] == pytest.approx(1.099)
    # h2load's own summary says 2 failed + 1 timeout although the log has only 200s
    assert result.failed == 3
    assert not result.sustained

    clean = H2LOAD_OUTPUT.replace("2 failed, 1 errored, 1 timeout", "0 failed, 0 errored, 0 timeout")
    assert fixed_rate_result(clean, log, target_rps=1000).sustained
    assert not fixed_rate_result(clean, log, target_rps=1100).sustained  # 999.8 < 95 % of 1100


def test_load_tool_commands_send_the_host_header_each_tool_understands() -> None:
    wrk = wrk_command("http://127.77.1.1:15001/", connections=50, duration_s=10, script="d.lua", host="upstream")
    assert wrk[:4] == ["wrk", "-t1", "-c50", "-d10s"]
    assert ["-H", "Host: upstream"] == wrk[-3:-1] and wrk[-1] == "http://127.77.1.1:15001/"
    h2 = h2load_command("http://127.77.1.1:15001/", rate=1000, duration_s=10, log_file="f", host="upstream")
    assert "--h1" in h2 and "--rps=1000" in h2 and "-c1" in h2
    # "-H host:" would make h2load send two Host headers (nginx answers 400)
    assert ["-H", ":authority: upstream"] == h2[-3:-1]
    with pytest.raises(BenchError, match="multiple"):
        h2load_command("http://x/", rate=1001, duration_s=1, log_file="f", connections=2)


def test_proc_stat_cpu_ticks_survive_a_command_name_with_spaces_and_parentheses() -> None:
    stat = "4242 (python (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0 1000 0 0"
    assert parse_stat_cpu_ticks(stat) == 325


def test_proc_status_values_are_read_in_kilobytes() -> None:
    status = "Name:\tenvoy\nVmHWM:\t   68096 kB\nVmRSS:\t   65536 kB\n"
    assert parse_status_kb(status, "VmHWM") == 68096
    assert parse_status_kb(status, "VmRSS") == 65536
    with pytest.raises(BenchError):
        parse_status_kb(status, "VmSwap")


def test_saturation_rounds_add_up_and_keep_the_median_rounds_latency() -> None:
    from benchmarks.loadtools import WrkResult, merge_wrk

    def one(requests: int, p99: float, read_errors: int = 0) -> WrkResult:
        return WrkResult(requests=requests, duration_s=5.0, errors={"read": read_errors, "status": 0},
                         latency_ms={"p99": p99})

    merged = merge_wrk([one(50_000, 3.0), one(10_000, 9.0, read_errors=2), one(40_000, 4.0)])
    assert merged.requests == 100_000 and merged.duration_s == 15.0
    assert merged.rps == pytest.approx(100_000 / 15)
    assert merged.errors == {"read": 2, "status": 0}
    assert merged.latency_ms == {"p99": 4.0}  # the 40k round is the median


def test_fixed_rate_rounds_pool_latencies_and_need_every_round_to_keep_up() -> None:
    clean = H2LOAD_OUTPUT.replace("2 failed, 1 errored, 1 timeout", "0 failed, 0 errored, 0 timeout")
    slow = clean.replace("999.80 req/s", "900.00 req/s")
    fast_log = "".join(f"{i}\t200\t100\n" for i in range(99))
    slow_log = f"0\t200\t{50_000}\n"
    result = fixed_rate_result([clean, slow], [fast_log, slow_log], target_rps=1000)
    assert result.requests == 100
    assert result.latency_ms["p99"] == pytest.approx(0.1)
    assert result.latency_ms["max"] == pytest.approx(50.0)
    assert result.achieved_rps == pytest.approx(900.0)
    assert not result.sustained
