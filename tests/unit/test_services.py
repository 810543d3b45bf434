"""Pure parts of the demo services: catalogue, config parsing, downstream answer interpretation."""

from __future__ import annotations

import pytest

from services.catalogue import COVER_IMAGE_ID_OFFSET, Catalogue, default_catalogue
from services.common import parse_id
from services.config import DEFAULT_PORT, DEFAULT_TIMEOUT_S, ServiceConfig, parse_config
from services.downstream import DownstreamError, DownstreamResponse, failure_status, interpret
from services.song import details_document, song_targets


def test_catalogue_holds_at_least_twenty_songs_by_eight_artists() -> None:
    cat = default_catalogue()
    assert len(cat.songs) >= 20
    assert len(cat.artists) == 8
    assert {s.artist_id for s in cat.songs.values()} == set(cat.artists)


def test_catalogue_references_all_resolve() -> None:
    cat = default_catalogue()
    assert cat.dangling_references() == []
    for song in cat.songs.values():
        assert cat.images[song.image_id].kind == "cover"
        assert song.image_id == COVER_IMAGE_ID_OFFSET + song.id
    for artist in cat.artists.values():
        assert cat.images[artist.image_id].kind == "artist"


def test_catalogue_reports_a_song_pointing_at_a_missing_artist() -> None:
    cat = default_catalogue()
    broken = Catalogue(artists={}, songs={1: cat.songs[1]}, images=dict(cat.images))
    assert broken.dangling_references() == ["song 1 -> artist 1"]


def test_catalogue_is_deterministic_and_immutable() -> None:
    cat = default_catalogue()
    assert cat.songs[1].title == "Control Plane Blues"
    assert cat.songs[1].artist_id == 1
    assert sorted(cat.songs) == list(range(1, len(cat.songs) + 1))
    with pytest.raises(TypeError):
        cat.songs[99] = cat.songs[1]  # type: ignore[index]
    with pytest.raises(AttributeError):
        cat.songs[1].title = "x"  # type: ignore[misc]


def test_images_are_metadata_with_url_and_size() -> None:
    image = default_catalogue().images[101]
    doc = image.to_dict()
    assert set(doc) == {"id", "url", "width", "height", "alt", "kind"}
    assert doc["url"].startswith("https://") and doc["width"] > 0 and doc["height"] > 0


@pytest.mark.parametrize("text,expected", [
    ("1", 1), ("007", 7), ("24", 24),
    ("", None), ("x", None), ("-1", None), ("1.5", None), ("١", None), ("9" * 40, None), (" 1", None),
])
def test_parse_id_accepts_only_plain_decimal_numbers(text: str, expected: int | None) -> None:
    assert parse_id(text) == expected


def test_config_defaults_follow_the_contract() -> None:
    config = parse_config(["artist"], environ={})
    assert (config.name, config.host, config.port) == ("artist", "127.0.0.1", DEFAULT_PORT)
    assert config.proxy is None
    assert config.timeout_s == DEFAULT_TIMEOUT_S
    assert (config.artist_url, config.image_url) == ("http://artist", "http://image")
    assert config.access_log is False


def test_config_takes_proxy_and_instance_from_the_environment() -> None:
    env = {"HTTP_PROXY": "http://127.0.0.1:15001", "SIDEMESH_INSTANCE": "song-3", "SIDEMESH_TIMEOUT": "2.5"}
    config = parse_config(["song"], environ=env)
    assert config.proxy == "http://127.0.0.1:15001"
    assert config.instance == "song-3"
    assert config.timeout_s == 2.5


def test_config_flags_win_over_the_environment_and_empty_proxy_means_direct() -> None:
    env = {"HTTP_PROXY": "http://127.0.0.1:15001", "SIDEMESH_INSTANCE": "from-env"}
    config = parse_config(["song", "--proxy", "", "--instance", "song-9", "--artist-url", "http://127.0.0.2:81/",
                           "--timeout", "0.5", "--port", "9000"], environ=env)
    assert config.proxy is None
    assert config.instance == "song-9"
    assert config.artist_url == "http://127.0.0.2:81"
    assert (config.timeout_s, config.port) == (0.5, 9000)


@pytest.mark.parametrize("argv", [
    ["nosuch"], [], ["artist", "--port", "0"], ["artist", "--port", "70000"], ["artist", "--port", "http"],
    ["song", "--timeout", "0"], ["song", "--timeout", "soon"], ["song", "--proxy", "socks5://x:1"],
    ["song", "--artist-url", "artist"], ["artist", "--log-level", "loud"],
])
def test_config_rejects_bad_input_with_exit_code_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_config(argv, environ={})
    assert info.value.code == 2
    assert "sidemesh service: error:" in capsys.readouterr().err


def test_config_rejects_a_bad_log_level_from_the_environment() -> None:
    with pytest.raises(SystemExit) as info:
        parse_config(["artist"], environ={"SIDEMESH_LOG_LEVEL": "chatty"})
    assert info.value.code == 2


def test_failure_status_passes_503_through_and_maps_everything_else_to_502() -> None:
    assert failure_status(503) == 503
    assert [failure_status(s) for s in (None, 404, 500, 502, 504, 200)] == [502] * 6


def test_interpret_returns_the_object_and_route_of_a_200_answer() -> None:
    resp = interpret("artist", 200, b'{"id": 1}', "dns")
    assert resp == DownstreamResponse({"id": 1}, "dns")


def test_interpret_turns_a_sidecar_503_into_503_naming_the_service_and_its_reason() -> None:
    with pytest.raises(DownstreamError) as info:
        interpret("artist", 503, b'{"error": "no endpoints for artist", "service": "artist"}', "dns")
    err = info.value
    assert (err.service, err.status, err.upstream_status) == ("artist", 503, 503)
    assert err.to_dict()["error"] == "artist unavailable: HTTP 503: no endpoints for artist"


@pytest.mark.parametrize("status,body", [
    (200, b"<html>oops</html>"), (200, b"[1, 2]"), (200, b""), (404, b'{"error": "artist 1 not found"}'),
    (500, b"Internal Server Error"), (200, b"\xff\xfe"),
])
def test_interpret_treats_bad_answers_as_bad_gateway(status: int, body: bytes) -> None:
    with pytest.raises(DownstreamError) as info:
        interpret("image", status, body, None)
    assert info.value.status == 502
    assert info.value.service == "image"
    assert info.value.to_dict()["error"].startswith("image unavailable: ")


def test_details_document_combines_song_artist_image_and_routes() -> None:
    cat = default_catalogue()
    target = song_targets(cat, ServiceConfig(name="song", instance="song-1", artist_url="http://a"))[1]
    assert target.artist_url == "http://a/artists/1"
    assert target.image_url == "http://image/images/101"
    doc = details_document(target, DownstreamResponse({"id": 1}, "controlplane"),
                           DownstreamResponse({"id": 101}, None), "song-1")
    assert doc["song"]["title"] == "Control Plane Blues"  # type: ignore[index]
    assert doc["via"] == {"artist": "controlplane", "image": None}
    assert doc["served_by"] == "song-1"
