"""Flags and SIDEMESH_* env vars into a frozen ControlPlaneConfig."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from controlplane.adminauth import ENV_ADMIN_TOKEN
from controlplane.config import ConfigError, ControlPlaneConfig, parse_args, parse_policy
from controlplane.limits import DEFAULT_SNAPSHOT_BUDGET_BYTES, SIDECAR_MAX_RECEIVE_BYTES, HelloLimits
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


def test_limit_flags_reach_the_config_and_the_grpc_receive_limit() -> None:
    cfg = parse_args(["--max-labels", "5", "--max-label-value-bytes", "99", "--max-request-bytes", "65536",
                      "--snapshot-budget-bytes", "200000"], env={})
    assert (cfg.hello_limits.max_labels, cfg.hello_limits.max_label_value_bytes) == (5, 99)
    assert cfg.hello_limits.max_known_endpoints == HelloLimits().max_known_endpoints
    assert cfg.snapshot_budget_bytes == 200000
    assert dict(cfg.grpc_server_options())["grpc.max_receive_message_length"] == 65536


def test_default_snapshot_budget_stays_under_what_sidecars_accept() -> None:
    cfg = parse_args([], env={})
    assert cfg.snapshot_budget_bytes == DEFAULT_SNAPSHOT_BUDGET_BYTES < SIDECAR_MAX_RECEIVE_BYTES == 4 * 1024 * 1024
    assert dict(cfg.grpc_server_options())["grpc.max_receive_message_length"] == 4 * 1024 * 1024


def test_admin_policy_defaults_to_loopback_without_a_token() -> None:
    cfg = parse_args([], env={})
    assert [str(n) for n in cfg.admin.allow] == ["127.0.0.0/8", "::1/128"]
    assert cfg.admin.token is None


def test_admin_token_comes_from_flag_env_or_file(tmp_path: Path) -> None:
    assert parse_args(["--admin-token", "flag-t"], env={ENV_ADMIN_TOKEN: "env-t"}).admin.token == "flag-t"
    assert parse_args([], env={ENV_ADMIN_TOKEN: "env-t"}).admin.token == "env-t"
    token_file = tmp_path / "token"
    token_file.write_text("file-t\n")
    cfg = parse_args(["--admin-token-file", str(token_file), "--admin-allow", "10.0.0.0/8,fd00::/8"], env={})
    assert cfg.admin.token == "file-t"
    assert [str(n) for n in cfg.admin.allow] == ["10.0.0.0/8", "fd00::/8"]
    assert parse_args(["--admin-allow", ""], env={}).admin.allow == ()
    assert "file-t" not in repr(cfg)  # the token never shows in a logged config


@pytest.mark.parametrize("argv", [
    ["--max-labels", "0"], ["--max-request-bytes", "lots"], ["--snapshot-budget-bytes", "-1"],
    ["--admin-allow", "localhost"], ["--admin-token", ""], ["--admin-token-file", "/nonexistent/token"],
    ["--admin-token", "a", "--admin-token-file", "/etc/hostname"],
])
def test_bad_limit_or_admin_flags_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(argv, env={})
    assert info.value.code == 2
    assert "sidemesh controlplane: error:" in capsys.readouterr().err
