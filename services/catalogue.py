"""The demo services' fixed catalogue: artists, songs and the images of both.

Everything here is plain, frozen and deterministic: the same ids always name
the same records, so tests, the docker demo and ``sidemesh up`` agree on what
``/songs/1/details`` returns. Images are metadata only (url, size, alt text);
no service ever serves binary data.

Ids: artists 1..8, songs 1..24 (three per artist), images 1..8 are artist
portraits (image id == artist id) and 101..124 are song covers
(image id == 100 + song id).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Any

IMAGE_BASE_URL = "https://images.sidemesh.invalid"
ARTIST_IMAGE_SIZE = 600
COVER_IMAGE_SIZE = 1000
COVER_IMAGE_ID_OFFSET = 100


@dataclass(frozen=True, slots=True)
class Artist:
    """A performer; ``image_id`` is their portrait."""

    id: int
    name: str
    country: str
    genre: str
    formed: int
    image_id: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Song:
    """A track; ``artist_id`` and ``image_id`` (its cover) point into the catalogue."""

    id: int
    title: str
    artist_id: int
    album: str
    year: int
    duration_s: int
    image_id: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Image:
    """Image metadata: where the picture lives and how big it is (never the bytes)."""

    id: int
    url: str
    width: int
    height: int
    alt: str
    kind: str  # "artist" (portrait) or "cover"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Catalogue:
    """Read-only id -> record maps of the three kinds of record."""

    artists: Mapping[int, Artist] = field(default_factory=lambda: MappingProxyType({}))
    songs: Mapping[int, Song] = field(default_factory=lambda: MappingProxyType({}))
    images: Mapping[int, Image] = field(default_factory=lambda: MappingProxyType({}))

    def dangling_references(self) -> list[str]:
        """Every reference that names a record the catalogue lacks (empty when sound)."""
        problems: list[str] = []
        for artist in self.artists.values():
            if artist.image_id not in self.images:
                problems.append(f"artist {artist.id} -> image {artist.image_id}")
        for song in self.songs.values():
            if song.artist_id not in self.artists:
                problems.append(f"song {song.id} -> artist {song.artist_id}")
            if song.image_id not in self.images:
                problems.append(f"song {song.id} -> image {song.image_id}")
        return problems


# (name, country, genre, formed, [(title, album, year, duration_s) x 3])
_ARTISTS: tuple[tuple[str, str, str, int, tuple[tuple[str, str, int, int], ...]], ...] = (
    ("The Quiet Pylons", "SE", "synth-pop", 2009, (
        ("Control Plane Blues", "Static Routes", 2012, 214),
        ("Heartbeat Timeout", "Static Routes", 2012, 187),
        ("Last Known Good", "Fallback", 2016, 242),
    )),
    ("Mira Okafor", "NG", "afrobeat", 2011, (
        ("Lagos Loopback", "Ports of Call", 2014, 256),
        ("Eight Zero Eight Zero", "Ports of Call", 2014, 231),
        ("Sidecar Love", "Two Containers", 2019, 199),
    )),
    ("Northern Resolver", "NO", "post-rock", 2005, (
        ("Time To Live", "Authoritative", 2008, 412),
        ("NXDOMAIN", "Authoritative", 2008, 367),
        ("Recursive Descent", "Glue Records", 2013, 488),
    )),
    ("Lena Varga", "HU", "jazz", 1998, (
        ("Round Robin", "Balancing Act", 2001, 305),
        ("Least Request", "Balancing Act", 2001, 276),
        ("Ejected Endpoint", "Outlier", 2010, 333),
    )),
    ("Paper Lanterns", "JP", "city pop", 1984, (
        ("Midnight Snapshot", "Versioned", 1986, 268),
        ("Nonce", "Versioned", 1986, 221),
        ("ACK / NACK", "Handshake", 1989, 245),
    )),
    ("Dos Puertos", "MX", "cumbia", 2014, (
        ("Quince Mil Uno", "Egreso", 2017, 238),
        ("Quince Mil Seis", "Ingreso", 2018, 226),
        ("Baile del Proxy", "Ingreso", 2018, 251),
    )),
    ("Static Bloom", "GB", "shoegaze", 1990, (
        ("Keepalive", "Long Poll", 1992, 379),
        ("Half-Open", "Long Poll", 1992, 344),
        ("Backoff With Jitter", "Full Jitter", 1995, 401),
    )),
    ("Ama Kwarteng", "GH", "highlife", 2001, (
        ("Graceful Shutdown", "Drain", 2004, 262),
        ("Exit Zero", "Drain", 2004, 190),
        ("Back To The Control Plane", "Resync", 2022, 283),
    )),
)


def _build() -> Catalogue:
    artists: dict[int, Artist] = {}
    songs: dict[int, Song] = {}
    images: dict[int, Image] = {}
    song_id = 0
    for artist_id, (name, country, genre, formed, tracks) in enumerate(_ARTISTS, start=1):
        artists[artist_id] = Artist(artist_id, name, country, genre, formed, image_id=artist_id)
        images[artist_id] = Image(
            id=artist_id,
            url=f"{IMAGE_BASE_URL}/artists/{artist_id}.jpg",
            width=ARTIST_IMAGE_SIZE,
            height=ARTIST_IMAGE_SIZE,
            alt=f"Portrait of {name}",
            kind="artist",
        )
        for title, album, year, duration_s in tracks:
            song_id += 1
            cover_id = COVER_IMAGE_ID_OFFSET + song_id
            songs[song_id] = Song(song_id, title, artist_id, album, year, duration_s, image_id=cover_id)
            images[cover_id] = Image(
                id=cover_id,
                url=f"{IMAGE_BASE_URL}/covers/{song_id}.jpg",
                width=COVER_IMAGE_SIZE,
                height=COVER_IMAGE_SIZE,
                alt=f"Cover of {album} by {name}",
                kind="cover",
            )
    return Catalogue(MappingProxyType(artists), MappingProxyType(songs), MappingProxyType(images))


CATALOGUE: Catalogue = _build()
"""The catalogue every demo service serves (immutable, so sharing it is safe)."""


def default_catalogue() -> Catalogue:
    """The fixed demo catalogue."""
    return CATALOGUE
