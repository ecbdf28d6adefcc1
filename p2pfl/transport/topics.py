"""The topic namespace: the one builder and the one parser of every topic and subscription filter.

Everything a node publishes lives under `p2pfl/{federation}/{publisher}/` in two shapes:

- `.../cert`: the publisher's certificate (retained; it carries the box key updates are sealed to);
- `.../revocations`: the root-signed revocation list the publisher holds (retained; p2pfl.revocation);
- `.../to/{recipient}/{index}`: part `index` of the latest update addressed to `recipient` (retained).

The broker's ACL, the links' subscriptions and the links' dispatch all go through this module, so
the three can never disagree on a shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from p2pfl.errors import ConfigError

QOS = 1  # every publish and subscription, on both sides
ROOT = "p2pfl"
ANY = "+"  # single-level wildcard
ALL = "#"  # multi-level wildcard
MAX_INDEX_DIGITS = 6  # a part index is at most this many ASCII digits


class Kind(StrEnum):
    """The level after the publisher, and how many levels follow it."""

    CERT = "cert"
    INBOX = "to"
    REVOCATIONS = "revocations"


_ARITY = {Kind.CERT: 0, Kind.INBOX: 2, Kind.REVOCATIONS: 0}


@dataclass(frozen=True)
class Topic:
    """A parsed `p2pfl/...` topic or filter; `kind` is None when the levels after the publisher
    match none of the shapes. Levels are kept as sent (they may be wildcards in a filter)."""

    federation_id: str
    publisher: str
    kind: Kind | None
    target: str = ""  # INBOX: the recipient
    index: str = ""  # INBOX: the part index, as text


def is_level(value: object) -> bool:
    """True for a string that can be one exact topic level (no separator, wildcard, NUL or '$')."""
    return (
        isinstance(value, str)
        and bool(value)
        and not any(c in value for c in "/+#\x00")
        and not value.startswith("$")
    )


def check_level(value: str, what: str) -> str:
    if not is_level(value):
        raise ConfigError(f"{what} {value!r} cannot be used as an MQTT topic level")
    return value


def _join(*levels: str) -> str:
    return "/".join((ROOT, *levels))


def cert_topic(federation_id: str, node_id: str) -> str:
    return _join(federation_id, node_id, Kind.CERT)


def revocations_topic(federation_id: str, node_id: str) -> str:
    return _join(federation_id, node_id, Kind.REVOCATIONS)


def update_topic(federation_id: str, node_id: str, recipient: str, index: int) -> str:
    """Topic of part `index` of the update `node_id` addresses to `recipient`."""
    return _join(federation_id, node_id, Kind.INBOX, recipient, str(index))


def cert_filter(federation_id: str) -> str:
    """Every publisher's certificate (subscribers need not know the broker owner's id)."""
    return cert_topic(federation_id, ANY)


def inbox_filter(federation_id: str, recipient: str) -> str:
    """Every part addressed to `recipient`."""
    return _join(federation_id, ANY, Kind.INBOX, recipient, ANY)


def parse_topic(topic: str) -> Topic | None:
    """Split a topic or filter; None unless it has at least `p2pfl/{federation}/{publisher}/{kind}`."""
    levels = topic.split("/")
    if len(levels) < 4 or levels[0] != ROOT:
        return None
    federation_id, publisher, name, rest = levels[1], levels[2], levels[3], levels[4:]
    kind = Kind(name) if name in _ARITY else None
    if kind is None or len(rest) != _ARITY[kind]:
        return Topic(federation_id, publisher, None)
    return Topic(federation_id, publisher, kind, *rest)


def part_index(text: str) -> int | None:
    """The part index of an inbox topic's last level, or None if it is not a short decimal number."""
    if text.isascii() and text.isdigit() and len(text) <= MAX_INDEX_DIGITS:
        return int(text)
    return None
