"""The named limits of a listener (sidecar/limits.py) and their flags (sidecar/config.py)."""

from __future__ import annotations

import pytest

from sidecar.config import parse_config
from sidecar.limits import DEFAULT_LIMITS, Limits, connections_for_open_files

BASE = ["--service", "song"]


def test_defaults_are_the_documented_ones() -> None:
    assert DEFAULT_LIMITS == Limits(
        max_url_bytes=8192, max_header_bytes=65536, max_headers=100, head_timeout_s=10.0,
        idle_timeout_s=300.0, max_connections=4096, max_pipelined=32, linger_s=2.0,
    )
    # RFC 9112 3: recipients SHOULD support request lines of at least 8000 octets
    assert DEFAULT_LIMITS.max_url_bytes >= 8000


@pytest.mark.parametrize("field", ["max_url_bytes", "max_headers", "head_timeout_s", "max_connections", "linger_s"])
def test_a_limit_of_zero_or_less_is_refused(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Limits(**{field: 0})


def test_the_raw_head_guard_covers_a_longest_target_with_a_largest_header_block() -> None:
    limits = Limits(max_url_bytes=100, max_header_bytes=1000)
    assert limits.head_guard_bytes == 1100


def test_the_timer_looks_no_later_than_the_shorter_of_head_and_idle_deadlines() -> None:
    assert Limits(head_timeout_s=10, idle_timeout_s=2).tick_s == 2
    assert Limits(head_timeout_s=3, idle_timeout_s=300).tick_s == 3


def test_connections_default_leaves_room_for_upstreams_in_the_open_file_limit() -> None:
    assert connections_for_open_files(1024) == 224
    # two listener contexts, each client connection with its upstream, plus the reserve
    assert 4 * connections_for_open_files(1024) + 128 <= 1024
    assert connections_for_open_files(1 << 20) == 16384
    assert connections_for_open_files(64) == 16  # never none at all


def test_limit_flags_reach_the_config() -> None:
    config = parse_config(
        [*BASE, "--max-url-bytes", "1000", "--max-header-bytes", "2000", "--max-headers", "20",
         "--head-timeout", "2.5", "--idle-timeout", "30", "--max-connections", "50",
         "--max-pipelined", "4", "--close-linger", "0.5"],
        env={},
    )
    assert config.limits == Limits(
        max_url_bytes=1000, max_header_bytes=2000, max_headers=20, head_timeout_s=2.5,
        idle_timeout_s=30.0, max_connections=50, max_pipelined=4, linger_s=0.5,
    )


def test_max_connections_defaults_to_the_open_file_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sidecar.config.open_file_limit", lambda: 1024)
    assert parse_config(BASE, env={}).limits.max_connections == 224


@pytest.mark.parametrize("flag", ["--max-headers", "--max-connections", "--head-timeout"])
def test_a_limit_flag_of_zero_is_a_usage_error(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_config([*BASE, flag, "0"], env={})
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err
