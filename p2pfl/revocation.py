"""Revocation lists: the root's signed word on which node ids are out, relayed from node to node.

Why: revocation used to be a list inside `federation.pub` that the admin copied to every node by hand.
A RevocationList is signed by the federation root key, so any node can pass it to any other: a peer
can relay a list, never forge or edit one. Its serial only grows (the admin's `federation revoke`
writes serial + 1); a node adopts a list only when it is newer than the one it holds, and revoked
ids stay revoked in a running node, so replaying an old list un-revokes nobody.

Wire form (msgpack): [tag, federation id, serial, issued_at, sorted node ids, signature]. Parsing is
strict and bounded before any per-item work: peers' bytes that are not exactly this are Rejected.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import nacl.signing

from p2pfl.errors import IdentityError, Reason, Rejected
from p2pfl.federation import FederationRoot
from p2pfl.identity import write_public_file

__all__ = [
    "MAX_REVOCATION_BYTES",
    "MAX_REVOKED",
    "REVOCATION_FILE",
    "RevocationList",
    "is_node_id",
    "load",
    "save",
]

REVOCATION_FILE = "revocations.bin"  # in the federation dir and in every node's data dir
REVOCATION_TAG = "p2pfl-revocations-1"  # first field of the signed body: never a certificate's body
MAX_REVOKED = 2048  # node ids in one list
MAX_REVOCATION_BYTES = 64 * 1024  # more than MAX_REVOKED ids need; larger bytes are not parsed
MAX_SERIAL = 2**53  # JSON-safe, far beyond any number of revocations
_FED_ID = re.compile(r"[0-9a-f]{16}")
_NODE_ID = re.compile(r"[0-9a-f]{16}")  # p2pfl.identity.node_id_for: 8 bytes of BLAKE2b, in hex
_SIG = 64


def is_node_id(value: object) -> bool:
    """True for a string shaped like a node id (16 lowercase hex chars)."""
    return isinstance(value, str) and _NODE_ID.fullmatch(value) is not None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True, kw_only=True)
class RevocationList:
    """Every node id the federation has revoked, as of `serial`, signed by the root."""

    federation_id: str
    serial: int
    issued_at: float
    revoked: frozenset[str]
    signature: bytes = b""

    def _body(self) -> list[Any]:
        return [REVOCATION_TAG, self.federation_id, self.serial, float(self.issued_at), sorted(self.revoked)]

    def signed_bytes(self) -> bytes:
        """The exact bytes the root signs: every field except the signature, msgpack-encoded."""
        return msgpack.packb(self._body(), use_bin_type=True)

    def to_bytes(self) -> bytes:
        return msgpack.packb([*self._body(), bytes(self.signature)], use_bin_type=True)

    @classmethod
    def sign(
        cls,
        key: nacl.signing.SigningKey,
        serial: int,
        revoked: frozenset[str] | set[str],
        issued_at: float | None = None,
    ) -> RevocationList:
        """The admin's side: a list signed by the root key `key` (federation id derived from it)."""
        from p2pfl.federation import federation_id_for

        ids = frozenset(revoked)
        bad = sorted(i for i in ids if not is_node_id(i))
        if bad:
            raise ValueError(f"not node ids (16 hex chars): {', '.join(map(repr, bad[:3]))}")
        if len(ids) > MAX_REVOKED:
            raise ValueError(f"a revocation list holds at most {MAX_REVOKED} node ids")
        if not (_is_int(serial) and 0 < serial < MAX_SERIAL):
            raise ValueError("serial must be a positive integer")
        unsigned = cls(
            federation_id=federation_id_for(bytes(key.verify_key)),
            serial=serial,
            issued_at=time.time() if issued_at is None else float(issued_at),
            revoked=ids,
        )
        signature = key.sign(unsigned.signed_bytes()).signature
        return cls(
            federation_id=unsigned.federation_id,
            serial=serial,
            issued_at=unsigned.issued_at,
            revoked=ids,
            signature=signature,
        )

    @classmethod
    def from_bytes(cls, data: object) -> RevocationList:
        """Parse strictly; anything but a well-formed list is Rejected (MALFORMED, or OVERSIZE)."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise Rejected(Reason.MALFORMED, "revocation list is not bytes")
        if len(data) > MAX_REVOCATION_BYTES:
            raise Rejected(
                Reason.OVERSIZE, f"revocation list of {len(data)} bytes (at most {MAX_REVOCATION_BYTES})"
            )
        try:
            return cls._parse(bytes(data))
        except Rejected:
            raise
        except Exception as exc:  # never let a parser error escape as another type
            raise Rejected(
                Reason.MALFORMED, f"revocation list does not parse ({type(exc).__name__})"
            ) from None

    @classmethod
    def _parse(cls, data: bytes) -> RevocationList:
        obj = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_array_len=MAX_REVOKED,
            max_map_len=0,
            max_str_len=64,
            max_bin_len=_SIG,
            max_ext_len=0,
        )
        if not isinstance(obj, list) or len(obj) != 6 or obj[0] != REVOCATION_TAG:
            raise Rejected(Reason.MALFORMED, "not a p2pfl revocation list")
        _, fed, serial, issued_at, ids, sig = obj
        if not (isinstance(fed, str) and _FED_ID.fullmatch(fed)):
            raise Rejected(Reason.MALFORMED, "revocation list federation id must be 16 hex chars")
        if not (_is_int(serial) and 0 < serial < MAX_SERIAL):
            raise Rejected(Reason.MALFORMED, "revocation list serial must be a positive integer")
        if not (
            isinstance(issued_at, float | int)
            and not isinstance(issued_at, bool)
            and math.isfinite(issued_at)
        ):
            raise Rejected(Reason.MALFORMED, "revocation list time must be a finite number")
        if not (isinstance(ids, list) and all(is_node_id(i) for i in ids)):
            raise Rejected(Reason.MALFORMED, "revoked entries must be node ids (16 hex chars)")
        if any(a >= b for a, b in zip(ids, ids[1:], strict=False)):
            raise Rejected(Reason.MALFORMED, "revoked node ids must be sorted and unique")
        if not (isinstance(sig, bytes) and len(sig) == _SIG):
            raise Rejected(Reason.MALFORMED, "revocation list signature must be 64 bytes")
        return cls(
            federation_id=fed,
            serial=serial,
            issued_at=float(issued_at),
            revoked=frozenset(ids),
            signature=sig,
        )

    def verify(self, root: FederationRoot) -> None:
        """Accept only a list of `root`'s federation that `root` signed."""
        if self.federation_id != root.federation_id:
            raise Rejected(
                Reason.WRONG_FEDERATION,
                f"revocation list is for federation {self.federation_id!r}, ours is {root.federation_id!r}",
            )
        if not root.signed(self.signed_bytes(), self.signature):
            raise Rejected(
                Reason.BAD_SIGNATURE, f"revocation list {self.serial} is not signed by the federation root"
            )

    @classmethod
    def accept(cls, data: object, root: FederationRoot) -> RevocationList:
        """Parse and verify bytes from anywhere (a peer, a file): the root's list, or Rejected."""
        found = cls.from_bytes(data)
        found.verify(root)
        return found

    def newer_than(self, other: RevocationList | None) -> bool:
        return other is None or self.serial > other.serial

    def apply(self, root: FederationRoot) -> FederationRoot:
        """`root` with these ids revoked too (revocation only adds: nobody is un-revoked in passing)."""
        return FederationRoot(root.public_key, root.revoked | self.revoked)


def save(path: Path, revocations: RevocationList) -> None:
    """Write atomically (public data; a torn list would stop the node at its next start)."""
    write_public_file(Path(path), revocations.to_bytes())


def load(path: Path, root: FederationRoot) -> RevocationList | None:
    """The verified list in `path`, None when there is none; a bad file is an IdentityError that says
    what to do (the node must not start with a list it cannot trust)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise IdentityError(f"cannot read revocation list {path}: {exc.strerror or exc}") from None
    try:
        return RevocationList.accept(data, root)
    except Rejected as exc:
        raise IdentityError(
            f"{path} is not a valid revocation list of this federation ({exc}); copy revocations.bin "
            "again from the federation admin's directory, or remove it (peers will hand the node theirs)"
        ) from None
