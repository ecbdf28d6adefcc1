"""The federation admin's record of every certificate the root issued (`registry.json`, public data).

Why: without it the admin could issue the same name twice and had to keep the node id printed at
issue time to revoke anyone. One entry per issued certificate: its name, node id, fingerprint,
validity, a serial in issue order, its status (active, revoked, superseded by a renewal or
replacement) and the certificate itself (public), so `show`, `renew` and `revoke NAME` need nothing
else. It never holds a secret key. The root key stays the authority: the registry is bookkeeping.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from p2pfl.errors import IdentityError, Rejected
from p2pfl.federation import Certificate
from p2pfl.identity import write_public_file

__all__ = ["REGISTRY_FILE", "Entry", "Registry", "Status"]

REGISTRY_FILE = "registry.json"
FORMAT = 1


class Status(StrEnum):
    ACTIVE = "active"
    REVOKED = "revoked"
    SUPERSEDED = "superseded"


@dataclass(frozen=True, kw_only=True)
class Entry:
    """One issued certificate."""

    serial: int
    name: str
    node_id: str
    fingerprint: str
    issued: float
    expires: float
    status: Status
    certificate: str  # the p2pfl certificate, hex (public)
    revoked_at: float | None = None
    superseded_by: int | None = None

    def cert(self) -> Certificate:
        return Certificate.from_bytes(bytes.fromhex(self.certificate))

    def shown_status(self, now: float | None = None) -> str:
        """The status a person reads: an active certificate past its expiry shows as expired."""
        t = time.time() if now is None else now
        return "expired" if self.status is Status.ACTIVE and t > self.expires else self.status.value

    def usable(self, now: float | None = None) -> bool:
        return self.shown_status(now) == Status.ACTIVE.value

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status.value}

    @classmethod
    def from_json(cls, doc: Any, where: str) -> Entry:
        if not isinstance(doc, dict):
            raise IdentityError(f"{where}: every entry must be an object")
        try:
            entry = cls(**{**doc, "status": Status(str(doc.get("status")))})
            cert = entry.cert()
        except (TypeError, ValueError, Rejected) as exc:
            raise IdentityError(f"{where}: entry {doc.get('serial')!r} is not valid ({exc})") from None
        if cert.node_id != entry.node_id or cert.name != entry.name:
            raise IdentityError(f"{where}: entry {entry.serial} does not match its certificate")
        return entry


@dataclass
class Registry:
    """Every certificate issued by one federation root, in issue order."""

    federation_id: str
    entries: list[Entry]
    revocation_serial: int = 0  # the serial of the last revocation list the root signed

    # -- lookups ------------------------------------------------------------------------------------

    def active(self, name: str, now: float | None = None) -> Entry | None:
        """The usable (active, not expired) certificate holding `name`, if any."""
        return next((e for e in reversed(self.entries) if e.name == name and e.usable(now)), None)

    def active_for_node(self, node_id: str, now: float | None = None) -> Entry | None:
        return next((e for e in reversed(self.entries) if e.node_id == node_id and e.usable(now)), None)

    def latest(self, name: str) -> Entry | None:
        """The most recent certificate issued under `name`, whatever its status."""
        return next((e for e in reversed(self.entries) if e.name == name), None)

    def by_node(self, node_id: str) -> list[Entry]:
        return [e for e in self.entries if e.node_id == node_id]

    # -- changes ------------------------------------------------------------------------------------

    def add(self, cert: Certificate) -> Entry:
        """Record a newly issued certificate; earlier active ones of the same name or node are superseded."""
        serial = max((e.serial for e in self.entries), default=0) + 1
        self.entries = [
            replace(e, status=Status.SUPERSEDED, superseded_by=serial)
            if e.status is Status.ACTIVE and (e.name == cert.name or e.node_id == cert.node_id)
            else e
            for e in self.entries
        ]
        entry = Entry(
            serial=serial,
            name=cert.name,
            node_id=cert.node_id,
            fingerprint=cert.fingerprint(),
            issued=cert.issued,
            expires=cert.expires,
            status=Status.ACTIVE,
            certificate=cert.to_bytes().hex(),
        )
        self.entries.append(entry)
        return entry

    def revoke(self, node_id: str, at: float) -> list[Entry]:
        """Mark every active certificate of `node_id` revoked (revocation is per node key); returns them."""
        hit = [e for e in self.entries if e.node_id == node_id and e.status is Status.ACTIVE]
        self.entries = [
            replace(e, status=Status.REVOKED, revoked_at=at) if e in hit else e for e in self.entries
        ]
        return hit

    # -- file ---------------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "federation_id": self.federation_id,
            "revocation_serial": self.revocation_serial,
            "certificates": [e.to_json() for e in self.entries],
        }

    def save(self, path: Path) -> None:
        write_public_file(Path(path), (json.dumps(self.to_json(), indent=1) + "\n").encode())

    @classmethod
    def load(cls, path: Path, federation_id: str) -> Registry:
        """The registry in `path`; an empty one when the file does not exist yet (an older federation)."""
        path = Path(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cls(federation_id, [])
        except OSError as exc:
            raise IdentityError(f"cannot read {path}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise IdentityError(f"{path} is not valid JSON ({exc}); restore it from a backup") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise IdentityError(f"{path} is not a p2pfl registry (format {FORMAT})")
        if doc.get("federation_id") != federation_id:
            raise IdentityError(
                f"{path} belongs to federation {doc.get('federation_id')!r}, not {federation_id!r}"
            )
        serial = doc.get("revocation_serial", 0)
        entries = doc.get("certificates", [])
        if (
            not isinstance(serial, int)
            or isinstance(serial, bool)
            or serial < 0
            or not isinstance(entries, list)
        ):
            raise IdentityError(f"{path}: revocation_serial or certificates has the wrong type")
        return cls(federation_id, [Entry.from_json(e, str(path)) for e in entries], serial)
