"""Typed errors. Every rejection of peer bytes carries a machine-readable reason for the metrics."""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "ConfigError",
    "IdentityError",
    "P2PFLError",
    "Reason",
    "Rejected",
    "TransportError",
]


class P2PFLError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(P2PFLError):
    """The node configuration is invalid; the message says which key and how to fix it."""


class IdentityError(P2PFLError):
    """Key or certificate files are missing, unreadable or inconsistent."""


class TransportError(P2PFLError):
    """A broker could not be started or reached."""


class Reason(StrEnum):
    """Why an incoming message was refused; each value is a metrics counter name."""

    MALFORMED = "malformed"  # bytes that do not parse as our framing / msgpack / codec
    OVERSIZE = "oversize"  # larger than the configured maximum
    BAD_SIGNATURE = "bad_signature"  # Ed25519 signature over the header does not verify
    UNKNOWN_SENDER = "unknown_sender"  # sender has no certificate we know
    UNCERTIFIED = "uncertified"  # certificate does not chain to our federation root
    WRONG_FEDERATION = "wrong_federation"  # header or certificate names another federation
    EXPIRED = "expired"  # certificate expired
    REVOKED = "revoked"  # certificate on the revocation list
    NOT_RECIPIENT = "not_recipient"  # content key not wrapped for us
    DIGEST_MISMATCH = "digest_mismatch"  # ciphertext does not match the signed digest
    DECRYPT_FAILED = "decrypt_failed"  # AEAD tag or key unwrap failed
    REPLAY = "replay"  # sequence number already seen / not newer
    STALE = "stale"  # timestamp outside the freshness window
    ROUND_WINDOW = "round_window"  # round too far ahead of ours
    LATE = "late"  # update for a round we already closed
    SHAPE_MISMATCH = "shape_mismatch"  # tensor names or shapes differ from the local model
    DTYPE_MISMATCH = "dtype_mismatch"  # tensor dtype differs from the local model
    NON_FINITE = "non_finite"  # NaN or Inf in the values
    AUTH_FAILED = "auth_failed"  # broker refused a client's credentials
    # the front door (before any MQTT byte is parsed) and the TLS session
    CONN_LIMIT = "conn_limit"  # too many unauthenticated connections, in all or from one address
    HANDSHAKE = "handshake"  # TLS handshake failed or did not finish in time
    PEER_IDENTITY = "peer_identity"  # TLS peer certificate names another node than expected / its client id
    # bounded work per certified update
    TOO_MANY_PARTS = "too_many_parts"  # more parts (or smaller ones) than the message size allows
    TOO_MANY_TENSORS = "too_many_tensors"  # header lists more tensors than allowed
    NEIGHBOUR_BUDGET = "neighbour_budget"  # a neighbour sent more bytes in a round than allowed
    # compressed updates (p2pfl.compression)
    COMPRESSION = "compression"  # the update's compression differs from this federation's setting
    OUT_OF_SYNC = "out_of_sync"  # a diff extends an estimate we do not hold (until the next keyframe)
    # discovery
    FOREIGN_ADVERT = "foreign_advert"  # mDNS advertisement from outside the configured networks


class Rejected(P2PFLError):
    """An incoming message was refused; `reason` is the counter, `detail` the log text."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail
