"""`sidemesh up`'s dashboard options: where it listens, how it is turned off, and why it is left out."""

from __future__ import annotations

import dataclasses
import socket

import pytest

from sidemesh.layout import HostPort
from sidemesh.up import ENV_DASHBOARD, dashboard_problem, parse_args


@pytest.fixture(autouse=True)
def _no_dashboard_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_DASHBOARD, raising=False)


def test_up_starts_the_dashboard_on_127_0_0_1_15080_by_default() -> None:
    assert parse_args([]).dashboard == HostPort("127.0.0.1", 15080)


def test_the_dashboard_address_comes_from_the_flag_or_the_dashboards_own_environment_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert parse_args(["--dashboard", "15090"]).dashboard == HostPort("127.0.0.1", 15090)
    assert parse_args(["--dashboard", "127.0.0.5:16000"]).dashboard == HostPort("127.0.0.5", 16000)
    monkeypatch.setenv(ENV_DASHBOARD, "127.0.0.6:16001")
    assert parse_args([]).dashboard == HostPort("127.0.0.6", 16001)


@pytest.mark.parametrize("argv", [["--no-dashboard"], ["--dashboard", "0"], ["--dashboard", "off"],
                                  ["--dashboard", "127.0.0.1:15080", "--no-dashboard"]])
def test_port_0_off_or_no_dashboard_turn_it_off(argv: list[str]) -> None:
    assert parse_args(argv).dashboard is None


def test_a_malformed_dashboard_address_stops_up_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(["--dashboard", "127.0.0.1:99999"])
    assert exc.value.code == 2 and "out of range" in capsys.readouterr().err


def test_a_taken_dashboard_port_is_named_as_the_reason_to_leave_the_dashboard_out() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = parse_args(["--dashboard", f"127.0.0.1:{port}"])
        why = dashboard_problem(config)
    assert why is not None and f"127.0.0.1:{port}/tcp: already in use" in why


def test_a_dashboard_on_the_published_address_or_the_control_api_is_left_out_and_a_free_port_is_fine() -> None:
    config = parse_args(["--publish", "127.0.0.1:15080"])
    assert "published address" in (dashboard_problem(config) or "")
    config = parse_args(["--control", "127.0.0.1:15080"])
    assert "control API" in (dashboard_problem(config) or "")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    assert dashboard_problem(parse_args(["--dashboard", str(free)])) is None
    assert dashboard_problem(dataclasses.replace(parse_args([]), dashboard=None)) is None
