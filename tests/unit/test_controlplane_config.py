"""Flags and SIDEMESH_* env vars into a frozen ControlPlaneConfig."""

from __future__ import annotations

import dataclasses

import pytest

from controlplane.config import ConfigError, ControlPlaneConfig, parse_args, parse_policy
from controlplane.model import ServicePolicy


def test_defaults_match_the_contract() -> None:
    cfg = parse_args([], env={})
    assert (cfg.listen, cfg.grpc_port, cfg.http_port) == ("0.0.0.0", 15010, 15014)
    assert (cfg.coalesce_ms, cfg.warmup_timeout, cfg.log_level) == (10.0, 1.0, "info")
    assert cfg.policy_for("artist") == ServicePolicy(5000, 1, "round_robin")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.grpc_port = 1  # type: ignore[misc]


def test_env_vars_are_fallbacks_and_flags_win() -> None:
    env = {"SIDEMESH_CP_GRPC_PORT": "16010", "SIDEMESH_CP_WARMUP_TIMEOUT": "2.5",
           "SIDEMESH_CP_POLICY": "artist=timeout_ms:100;song=lb:least_request"}
    cfg = parse_args(["--grpc-port", "17010"], env=env)
    assert (cfg.grpc_port, cfg.warmup_timeout) == (17010, 2.5)
    assert cfg.policy_for("artist").timeout_ms == 100
    assert cfg.policy_for("song").lb == "least_request"


def test_policy_flag_overrides_per_service() -> None:
    cfg = parse_args(["--policy", "artist=timeout_ms:2000,retries:0,lb:least_request"], env={})
    assert cfg.policy_for("artist") == ServicePolicy(2000, 0, "least_request")
    assert cfg.policy_for("song") == ServicePolicy()


@pytest.mark.parametrize("spec", ["artist", "Artist=retries:1", "artist=retries:x", "artist=lb:random",
                                  "artist=color:red", "artist=retries", "artist=timeout_ms:-5"])
def test_bad_policy_is_refused(spec: str) -> None:
    with pytest.raises(ConfigError):
        parse_policy(spec)


@pytest.mark.parametrize("argv,env", [
    (["--http-port", "99999"], {}), (["--warmup-timeout", "-1"], {}), (["--policy", "x=lb:nope"], {}),
    ([], {"SIDEMESH_CP_GRPC_PORT": "abc"}), ([], {"SIDEMESH_LOG_LEVEL": "loud"}),
])
def test_usage_errors_exit_2(argv: list[str], env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(argv, env=env)
    assert info.value.code == 2
    assert "sidemesh controlplane: error:" in capsys.readouterr().err


def test_server_options_allow_sidecar_keepalive_and_ping_back() -> None:
    opts = dict(ControlPlaneConfig().grpc_server_options())
    assert opts["grpc.keepalive_permit_without_calls"] == 1
    assert opts["grpc.http2.min_recv_ping_interval_without_data_ms"] <= 1000
    assert opts["grpc.http2.max_ping_strikes"] == 0
    assert opts["grpc.keepalive_time_ms"] <= 5000
