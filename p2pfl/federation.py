"""Federation membership: a root key certifies node keys; nodes trust only certified peers.

The root signing key stays offline with the federation admin (FederationAuthority). Every node holds
only the root public key and the revocation list (FederationRoot, the `federation.pub` file) and
checks each peer's Certificate against it. The root is also an X.509 CA (`ca.crt`, see p2pfl.tls):
issuing a node writes its p2pfl Certificate and its TLS certificate, so MQTT sessions are mutual TLS
between certified keys and need no passwords or tokens.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from dataclasses import replace as _replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import nacl.exceptions
import nacl.signing

from p2pfl.errors import IdentityError, Reason, Rejected
from p2pfl.identity import (
    ensure_private_dir,
    node_id_for,
    read_private_key,
    signed_by,
    write_private_file,
    write_public_file,
)

if TYPE_CHECKING:
    from p2pfl.registry import Registry
    from p2pfl.revocation import RevocationList

__all__ = [
    "CERTIFICATE_FILE",
    "CERT_TAG",
    "Certificate",
    "FEDERATION_FILE",
    "FederationAuthority",
    "FederationRoot",
    "MAX_CERT_BYTES",
    "NameTaken",
    "ROOT_KEY_FILE",
    "UnknownNode",
    "federation_id_for",
]

CERT_TAG = "p2pfl-cert-1"
ROOT_KEY_FILE = "root.key"
FEDERATION_FILE = "federation.pub"
CERTIFICATE_FILE = "certificate"

MAX_CERT_BYTES = 4096
_MAX_NAME = 256
_MAX_ID = 64
_KEY = 32
_SIG = 64
# A certificate issued slightly "in the future" is accepted: node clocks differ a little.
ISSUE_SKEW_S = 300.0


def federation_id_for(public_key: bytes) -> str:
    """Federation id: 8-byte BLAKE2b of the root public key, as 16 hex chars."""
    return hashlib.blake2b(bytes(public_key), digest_size=8).hexdigest()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite_number(v: Any) -> bool:
    return (isinstance(v, float) or _is_int(v)) and math.isfinite(v)


@dataclass(frozen=True, kw_only=True)
class Certificate:
    """A node's public keys and name, signed by the federation root."""

    node_id: str
    name: str
    federation_id: str
    sign_key: bytes
    box_key: bytes
    issued: float
    expires: float
    signature: bytes

    def _body(self) -> list[Any]:
        return [
            CERT_TAG,
            self.node_id,
            self.name,
            self.federation_id,
            bytes(self.sign_key),
            bytes(self.box_key),
            float(self.issued),
            float(self.expires),
        ]

    def signed_bytes(self) -> bytes:
        """The exact bytes the root signs: every field except the signature, msgpack-encoded."""
        return msgpack.packb(self._body(), use_bin_type=True)

    def to_bytes(self) -> bytes:
        return msgpack.packb([*self._body(), bytes(self.signature)], use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> Certificate:
        """Parse strictly; anything but a well-formed certificate is Rejected(MALFORMED)."""
        try:
            return cls._parse(data)
        except Rejected:
            raise
        except Exception as exc:  # never let a parser error escape as another type
            raise Rejected(Reason.MALFORMED, f"certificate does not parse ({type(exc).__name__})") from None

    @classmethod
    def _parse(cls, data: Any) -> Certificate:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise Rejected(Reason.MALFORMED, "certificate is not bytes")
        if len(data) > MAX_CERT_BYTES:
            raise Rejected(Reason.MALFORMED, f"certificate larger than {MAX_CERT_BYTES} bytes")
        obj = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
        if not isinstance(obj, list) or len(obj) != 9 or obj[0] != CERT_TAG:
            raise Rejected(Reason.MALFORMED, "not a p2pfl certificate")
        _, node_id, name, fed, sign_key, box_key, issued, expires, sig = obj
        if not (isinstance(node_id, str) and 0 < len(node_id) <= _MAX_ID):
            raise Rejected(Reason.MALFORMED, "certificate node_id must be a short string")
        if not (isinstance(name, str) and len(name) <= _MAX_NAME):
            raise Rejected(Reason.MALFORMED, "certificate name must be a string")
        if not (isinstance(fed, str) and 0 < len(fed) <= _MAX_ID):
            raise Rejected(Reason.MALFORMED, "certificate federation_id must be a short string")
        if not (isinstance(sign_key, bytes) and len(sign_key) == _KEY):
            raise Rejected(Reason.MALFORMED, "certificate sign_key must be 32 bytes")
        if not (isinstance(box_key, bytes) and len(box_key) == _KEY):
            raise Rejected(Reason.MALFORMED, "certificate box_key must be 32 bytes")
        if not (_finite_number(issued) and _finite_number(expires)):
            raise Rejected(Reason.MALFORMED, "certificate times must be finite numbers")
        if not (isinstance(sig, bytes) and len(sig) == _SIG):
            raise Rejected(Reason.MALFORMED, "certificate signature must be 64 bytes")
        return cls(
            node_id=node_id,
            name=name,
            federation_id=fed,
            sign_key=sign_key,
            box_key=box_key,
            issued=float(issued),
            expires=float(expires),
            signature=sig,
        )

    def fingerprint(self) -> str:
        """16 hex chars identifying this exact certificate (fits an mDNS TXT record)."""
        return hashlib.blake2b(self.to_bytes(), digest_size=8).hexdigest()


@dataclass(frozen=True)
class FederationRoot:
    """What every node trusts: the root public key and the list of revoked node ids."""

    public_key: bytes
    revoked: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not (isinstance(self.public_key, bytes) and len(self.public_key) == _KEY):
            raise IdentityError("federation root public key must be 32 bytes")
        object.__setattr__(self, "revoked", frozenset(self.revoked))

    @property
    def federation_id(self) -> str:
        return federation_id_for(self.public_key)

    def signed(self, message: bytes, signature: bytes) -> bool:
        """Whether the root key signed `message` (certificates, revocation lists)."""
        return signed_by(self.public_key, message, signature)

    def verify(self, cert: Certificate, now: float | None = None) -> None:
        """Accept `cert` only if the root signed it, it names the right node, and it is current."""
        if cert.federation_id != self.federation_id:
            raise Rejected(
                Reason.WRONG_FEDERATION,
                f"certificate of {cert.node_id!r} is for federation {cert.federation_id!r}, "
                f"ours is {self.federation_id!r}",
            )
        if not self.signed(cert.signed_bytes(), cert.signature):
            raise Rejected(
                Reason.UNCERTIFIED, f"certificate of {cert.node_id!r} is not signed by the federation root"
            )
        if cert.node_id != node_id_for(cert.sign_key):
            raise Rejected(Reason.UNCERTIFIED, f"certificate node_id {cert.node_id!r} does not match its key")
        if cert.node_id in self.revoked:
            raise Rejected(Reason.REVOKED, f"node {cert.node_id!r} is revoked")
        t = time.time() if now is None else now
        if t > cert.expires:
            raise Rejected(Reason.EXPIRED, f"certificate of {cert.node_id!r} expired at {cert.expires:.0f}")
        if t + ISSUE_SKEW_S < cert.issued:
            raise Rejected(Reason.EXPIRED, f"certificate of {cert.node_id!r} is not valid yet")

    def with_revoked(self, node_id: str) -> FederationRoot:
        return FederationRoot(self.public_key, self.revoked | {node_id})

    def save(self, path: Path) -> None:
        """Write the JSON file atomically (public data, but a torn file would lock the node out)."""
        path = Path(path)
        doc = {"root_public_key": self.public_key.hex(), "revoked": sorted(self.revoked)}
        _write_public_file(path, (json.dumps(doc, indent=2) + "\n").encode())

    @classmethod
    def load(cls, path: Path) -> FederationRoot:
        path = Path(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise IdentityError(f"cannot read federation file {path}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise IdentityError(f"federation file {path} is not valid JSON: {exc}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("root_public_key"), str):
            raise IdentityError(f"federation file {path} lacks 'root_public_key'")
        revoked = doc.get("revoked", [])
        if not isinstance(revoked, list) or not all(isinstance(r, str) for r in revoked):
            raise IdentityError(f"federation file {path}: 'revoked' must be a list of node ids")
        try:
            key = bytes.fromhex(doc["root_public_key"])
        except ValueError:
            raise IdentityError(f"federation file {path}: root_public_key is not hex") from None
        if len(key) != _KEY:
            raise IdentityError(f"federation file {path}: root_public_key must be 32 bytes")
        return cls(key, frozenset(revoked))


class FederationAuthority:
    """The federation admin's offline root key: issues and revokes node certificates."""

    def __init__(self, directory: Path, signing_key: nacl.signing.SigningKey, root: FederationRoot) -> None:
        self._dir = Path(directory)
        self._key = signing_key
        self._root = root

    def __repr__(self) -> str:
        return f"FederationAuthority(federation_id={self._root.federation_id!r}, dir={str(self._dir)!r})"

    @classmethod
    def create(cls, directory: Path) -> FederationAuthority:
        directory = ensure_private_dir(Path(directory))
        key_path = directory / ROOT_KEY_FILE
        if key_path.exists():
            raise IdentityError(f"{key_path} already exists; load it instead of creating a new federation")
        key = nacl.signing.SigningKey.generate()
        write_private_file(key_path, bytes(key))
        root = FederationRoot(bytes(key.verify_key))
        root.save(directory / FEDERATION_FILE)
        authority = cls(directory, key, root)
        authority._ensure_ca_file()
        return authority

    @classmethod
    def load(cls, directory: Path) -> FederationAuthority:
        directory = Path(directory)
        key = nacl.signing.SigningKey(read_private_key(directory / ROOT_KEY_FILE))
        pub_path = directory / FEDERATION_FILE
        public = bytes(key.verify_key)
        if pub_path.exists():
            root = FederationRoot.load(pub_path)
            if root.public_key != public:
                raise IdentityError(
                    f"{pub_path} belongs to another root key than {directory / ROOT_KEY_FILE}"
                )
        else:
            root = FederationRoot(public)
            root.save(pub_path)
        authority = cls(directory, key, root)
        authority._ensure_ca_file()  # a federation made before TLS gets its CA here, from root.key
        return authority

    @property
    def root(self) -> FederationRoot:
        return self._root

    @property
    def ca_pem(self) -> bytes:
        """The federation's X.509 CA certificate (PEM); the same bytes every time (see p2pfl.tls)."""
        from p2pfl.tls import ca_pem

        return ca_pem(bytes(self._key))

    def x509_pem(self, cert: Certificate) -> bytes:
        """The X.509 (TLS) twin of `cert`, signed by the CA: same key, node id, name and validity."""
        from p2pfl.tls import node_pem

        if cert.federation_id != self._root.federation_id:
            raise IdentityError(f"certificate of {cert.node_id!r} belongs to another federation")
        return node_pem(bytes(self._key), cert)

    def _ensure_ca_file(self) -> None:
        from p2pfl.tls import CA_FILE

        path = self._dir / CA_FILE
        if not path.exists():
            _write_public_file(path, self.ca_pem)

    # -- the registry and the revocation list -----------------------------------------------------

    @property
    def directory(self) -> Path:
        return self._dir

    def registry(self) -> Registry:
        """Every certificate this root issued (registry.json; empty for a federation made before it)."""
        from p2pfl.registry import REGISTRY_FILE, Registry

        return Registry.load(self._dir / REGISTRY_FILE, self._root.federation_id)

    def revocations(self) -> RevocationList | None:
        """The last revocation list this root signed (revocations.bin), if any."""
        from p2pfl import revocation

        return revocation.load(self._dir / revocation.REVOCATION_FILE, self._root)

    def resolve(self, name_or_id: str) -> str:
        """The node id a name in the registry stands for, or `name_or_id` itself if it is a node id."""
        from p2pfl.revocation import is_node_id

        registry = self.registry()
        entry = registry.latest(name_or_id)
        if entry is not None:
            return entry.node_id
        if is_node_id(name_or_id):
            return name_or_id
        raise UnknownNode(
            f"no certificate named {name_or_id!r} in {self._dir}/registry.json and it is no node id "
            "(16 hex chars); `p2pfl federation list` shows the names and ids"
        )

    # -- issuing ------------------------------------------------------------------------------------

    def issue(
        self,
        name: str,
        sign_key: bytes,
        box_key: bytes,
        ttl_s: float,
        *,
        node_dir: Path | None = None,
        replace: bool = True,
    ) -> Certificate:
        """Certify a node's keys for `ttl_s` seconds from now, and record it in the registry.

        With `node_dir`, also write there everything the node reads at start besides its keys: the
        certificate, federation.pub, its TLS certificate, the CA certificate and the revocation list.
        `replace=False` (the command line's default) refuses a name or node that already holds a
        current certificate; with True that one is superseded. A revoked node is never certified.
        """
        sign_key, box_key = bytes(sign_key), bytes(box_key)
        if len(sign_key) != _KEY or len(box_key) != _KEY:
            raise ValueError("sign_key and box_key must be 32 bytes each")
        if not isinstance(name, str) or len(name) > _MAX_NAME:
            raise ValueError(f"name must be a string of at most {_MAX_NAME} characters")
        if not (math.isfinite(ttl_s) and ttl_s > 0):
            raise ValueError("ttl_s must be a positive number of seconds")
        node_id = node_id_for(sign_key)
        if node_id in self._root.revoked:
            raise IdentityError(
                f"node {node_id} is revoked: it cannot be certified again; create new keys for it "
                "(`p2pfl keys --data-dir NEW_DIR`) and issue those"
            )
        registry = self.registry()
        if not replace:
            _check_unique(registry, name, node_id)
        issued = time.time()
        unsigned = Certificate(
            node_id=node_id,
            name=name,
            federation_id=self._root.federation_id,
            sign_key=sign_key,
            box_key=box_key,
            issued=issued,
            expires=issued + float(ttl_s),
            signature=b"",
        )
        signature = self._key.sign(unsigned.signed_bytes()).signature
        cert = _replace(unsigned, signature=signature)
        self._record(registry, cert)
        if node_dir is not None:
            self.write_node_files(cert, Path(node_dir))
        return cert

    def renew(self, name: str, ttl_s: float, *, node_dir: Path | None = None) -> Certificate:
        """A new certificate for the node holding `name`, same keys, valid `ttl_s` from now; the old
        one is superseded (it stays valid until it expires: the keys did not change)."""
        entry = self.registry().latest(name)
        if entry is None:
            raise UnknownNode(
                f"no certificate named {name!r} in {self._dir}/registry.json; `p2pfl federation list` "
                "shows the names (a federation made before the registry: issue it again with --replace)"
            )
        if entry.node_id in self._root.revoked:
            raise IdentityError(
                f"{name} ({entry.node_id}) is revoked; issue a certificate for new keys instead "
                f"(`p2pfl federation issue {name} --replace ...`)"
            )
        old = entry.cert()
        return self.issue(name, old.sign_key, old.box_key, ttl_s, node_dir=node_dir, replace=True)

    def _record(self, registry: Registry, cert: Certificate) -> None:
        registry.add(cert)
        from p2pfl.registry import REGISTRY_FILE

        registry.save(self._dir / REGISTRY_FILE)

    def write_node_files(self, cert: Certificate, node_dir: Path) -> None:
        """Write `cert`, the TLS files for it and the current revocation list into a node's data dir
        (created 0700 if missing)."""
        from p2pfl import revocation
        from p2pfl.tls import CA_FILE, NODE_CERT_FILE

        node_dir = ensure_private_dir(node_dir)
        self._ensure_ca_file()
        _write_public_file(node_dir / CERTIFICATE_FILE, cert.to_bytes())
        self._root.save(node_dir / FEDERATION_FILE)
        _write_public_file(node_dir / NODE_CERT_FILE, self.x509_pem(cert))
        _write_public_file(node_dir / CA_FILE, self.ca_pem)
        current = self.revocations()
        if current is not None:
            revocation.save(node_dir / revocation.REVOCATION_FILE, current)

    # -- revoking -----------------------------------------------------------------------------------

    def revoke(self, node_id: str) -> RevocationList:
        """Revoke `node_id` for good: a new signed revocation list (revocations.bin, serial + 1) that
        nodes pass to each other, federation.pub with the id added, and the registry updated."""
        from p2pfl import revocation

        if not revocation.is_node_id(node_id):
            raise IdentityError(f"{node_id!r} is not a node id (16 hex chars); pass a name or an id")
        registry = self.registry()
        current = self.revocations()
        if node_id in self._root.revoked and current is not None and node_id in current.revoked:
            return current  # already revoked and on the signed list: nothing new to sign
        serial = max(registry.revocation_serial, current.serial if current else 0) + 1
        revoked = self._root.revoked | (current.revoked if current else frozenset()) | {node_id}
        signed = revocation.RevocationList.sign(self._key, serial, revoked)
        revocation.save(self._dir / revocation.REVOCATION_FILE, signed)
        self._root = FederationRoot(self._root.public_key, revoked)
        self._root.save(self._dir / FEDERATION_FILE)
        registry.revoke(node_id, signed.issued_at)
        registry.revocation_serial = serial
        from p2pfl.registry import REGISTRY_FILE

        registry.save(self._dir / REGISTRY_FILE)
        return signed


class UnknownNode(IdentityError):
    """A name or id the registry does not know."""


class NameTaken(IdentityError):
    """A name (or node) that already holds a current certificate: renew it, revoke it, or pick another."""


def _check_unique(registry: Registry, name: str, node_id: str) -> None:
    held = registry.active(name)
    if held is not None:
        same = "the same keys" if held.node_id == node_id else f"node {held.node_id}"
        raise NameTaken(
            f"{name!r} already holds a current certificate ({same}, serial {held.serial}, expires "
            f"{_date(held.expires)}): `p2pfl federation renew {name}` extends it, `p2pfl federation "
            f"revoke {name}` ends it, `--replace` supersedes it, or pick another name"
        )
    other = registry.active_for_node(node_id)
    if other is not None:
        raise NameTaken(
            f"node {node_id} already holds a current certificate as {other.name!r}: renew that one "
            f"(`p2pfl federation renew {other.name}`), or pass --replace to certify it as {name!r} instead"
        )


def _date(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


_write_public_file = write_public_file  # the one atomic public-file writer (p2pfl.identity)
