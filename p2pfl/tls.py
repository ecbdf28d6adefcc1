"""Mutual TLS rooted in the federation: the root key is an X.509 CA, each node's signing key its TLS key.

Why: MQTT sessions used to carry reusable signed tokens in clear, so a sniffer or a rogue broker
could replay them. Now every session is TLS 1.3 with certificates on both sides that chain to the
federation root, and the peer's node id comes out of the handshake itself:

- the CA certificate is self-signed by the root's Ed25519 key; it is a pure function of that key
  (fixed serial, validity and fields), so a lost `ca.crt` is rebuilt identically from `root.key`;
- a node's leaf certificate holds the node's existing Ed25519 signing key (no new key to keep), names
  the node id (subject CN and a `urn:p2pfl:<federation>:<node>` SAN) and the node name, and is valid
  exactly as long as the node's p2pfl Certificate (including its issue-time skew allowance);
- `peer_node_id` derives the id from the peer's public key (ids are hashes of keys, so nobody can
  claim one without its key), checks the SAN agrees, re-checks the root's signature, and refuses
  revoked ids.

Everything here is synchronous and pure apart from reading the node's two PEM files.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import os
import shlex
import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from p2pfl.errors import IdentityError, Reason, Rejected
from p2pfl.federation import ISSUE_SKEW_S, Certificate, FederationRoot, federation_id_for
from p2pfl.identity import Identity, node_id_for

__all__ = [
    "CA_FILE",
    "NODE_CERT_FILE",
    "NodeTls",
    "ca_certificate",
    "ca_pem",
    "load_node_tls",
    "node_certificate",
    "node_id_of",
    "node_pem",
    "peer_node_id",
]

CA_FILE = "ca.crt"
NODE_CERT_FILE = "node.crt"
ORGANIZATION = "p2pfl"
URI_PREFIX = "urn:p2pfl:"
# The CA does not expire: a federation ends by replacing its root. 9999-12-31 is RFC 5280's "no end".
_CA_NOT_BEFORE = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
_CA_NOT_AFTER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)
MAX_PEER_CERT_BYTES = 8192


def _ed25519_private(seed: bytes) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes(seed))


def _serial(*parts: bytes) -> int:
    """A positive serial of at most 127 bits derived from `parts` (deterministic, unique per input)."""
    digest = hashlib.blake2b(b"".join(parts), digest_size=16, person=b"p2pfl-x509").digest()
    return (int.from_bytes(digest, "big") >> 1) or 1


def _ca_name(federation_id: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, f"p2pfl federation {federation_id}"),
        ]
    )


def _utc(ts: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(math.floor(ts), tz=datetime.UTC)


def ca_certificate(root_seed: bytes) -> x509.Certificate:
    """The federation CA: self-signed by the root key, identical every time it is built from it."""
    key = _ed25519_private(root_seed)
    public = key.public_key()
    raw = public.public_bytes_raw()
    name = _ca_name(federation_id_for(raw))
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(_serial(b"ca", raw))
        .not_valid_before(_CA_NOT_BEFORE)
        .not_valid_after(_CA_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, None)
    )


def ca_pem(root_seed: bytes) -> bytes:
    return ca_certificate(root_seed).public_bytes(serialization.Encoding.PEM)


def _node_uri(federation_id: str, node_id: str) -> str:
    return f"{URI_PREFIX}{federation_id}:{node_id}"


def node_certificate(root_seed: bytes, cert: Certificate) -> x509.Certificate:
    """The X.509 twin of a p2pfl Certificate: same key, node id, name and validity, signed by the CA."""
    ca_key = _ed25519_private(root_seed)
    ca_public = ca_key.public_key()
    public = Ed25519PublicKey.from_public_bytes(bytes(cert.sign_key))
    subject = [
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, cert.federation_id),
        x509.NameAttribute(NameOID.COMMON_NAME, cert.node_id),
    ]
    if cert.name:
        subject.append(x509.NameAttribute(NameOID.PSEUDONYM, cert.name))
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(_ca_name(cert.federation_id))
        .public_key(public)
        .serial_number(_serial(b"node", cert.to_bytes()))
        # a p2pfl Certificate dated slightly ahead is accepted (clocks differ); X.509 has no such
        # allowance, so notBefore moves back by the same amount
        .not_valid_before(_utc(cert.issued - ISSUE_SKEW_S))
        .not_valid_after(_utc(cert.expires))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(_node_uri(cert.federation_id, cert.node_id))]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public), critical=False)
        .sign(ca_key, None)
    )


def node_pem(root_seed: bytes, cert: Certificate) -> bytes:
    return node_certificate(root_seed, cert).public_bytes(serialization.Encoding.PEM)


def node_id_of(leaf: x509.Certificate, root: FederationRoot) -> str:
    """The node id a leaf certificate proves, or Rejected(PEER_IDENTITY / REVOKED).

    The id is computed from the certificate's key, never read from a name: the SAN must only agree.
    The root's signature is checked here as well, so the answer does not depend on how the TLS
    context was configured.
    """
    public = leaf.public_key()
    if not isinstance(public, Ed25519PublicKey):
        raise Rejected(Reason.PEER_IDENTITY, "peer certificate key is not Ed25519")
    try:
        Ed25519PublicKey.from_public_bytes(root.public_key).verify(leaf.signature, leaf.tbs_certificate_bytes)
    except InvalidSignature:
        raise Rejected(
            Reason.PEER_IDENTITY, "peer certificate is not signed by our federation root"
        ) from None
    node_id = node_id_for(public.public_bytes_raw())
    try:
        uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = uris.get_values_for_type(x509.UniformResourceIdentifier)
    except (x509.ExtensionNotFound, ValueError):
        names = []
    if _node_uri(root.federation_id, node_id) not in names:
        raise Rejected(
            Reason.PEER_IDENTITY, f"peer certificate does not name node {node_id} of this federation"
        )
    if node_id in root.revoked:
        raise Rejected(Reason.REVOKED, f"node {node_id!r} is revoked")
    return node_id


def peer_node_id(ssl_object: Any, root: FederationRoot) -> str:
    """The node id proven by the peer of a finished TLS handshake (an SSLObject or SSLSocket)."""
    try:
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    except (ValueError, OSError):  # not connected / handshake not done
        der = None
    if not der:
        raise Rejected(Reason.PEER_IDENTITY, "peer presented no certificate")
    if len(der) > MAX_PEER_CERT_BYTES:
        raise Rejected(Reason.PEER_IDENTITY, f"peer certificate larger than {MAX_PEER_CERT_BYTES} bytes")
    try:
        leaf = x509.load_der_x509_certificate(bytes(der))
    except ValueError:
        raise Rejected(Reason.PEER_IDENTITY, "peer certificate does not parse") from None
    return node_id_of(leaf, root)


def _context(purpose: int, ca: bytes, chain: bytes, key_seed: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_verify_locations(cadata=ca.decode("ascii"))
    key_pem = _ed25519_private(key_seed).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _load_chain(ctx, key_pem + chain)
    return ctx


def _load_chain(ctx: ssl.SSLContext, pem: bytes) -> None:
    """ssl loads keys only from files: use an anonymous in-memory file where there is one, else a
    0600 file in a private temporary directory, removed at once. The key is never written elsewhere."""
    memfd = getattr(os, "memfd_create", None)
    if memfd is not None and os.path.isdir("/proc/self/fd"):
        fd = memfd("p2pfl-tls", getattr(os, "MFD_CLOEXEC", 0))
        try:
            view = memoryview(pem)
            while view:
                view = view[os.write(fd, view) :]
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
            return
        except OSError:
            pass  # no usable /proc: fall back to a private file
        finally:
            os.close(fd)
    with tempfile.TemporaryDirectory(prefix="p2pfl-tls-") as directory:
        path = Path(directory) / "chain.pem"
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(handle, "wb") as fh:
            fh.write(pem)
        ctx.load_cert_chain(str(path))


@dataclass(frozen=True, repr=False)
class NodeTls:
    """A node's TLS credentials: its leaf and the CA (PEM) plus its identity's signing key."""

    identity: Identity
    cert_pem: bytes
    ca_pem: bytes
    node_id: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "node_id", self.identity.node_id)

    def __repr__(self) -> str:
        return f"NodeTls(node_id={self.node_id!r})"

    def _seed(self) -> bytes:
        return bytes(self.identity.signing_key)

    def server_context(self) -> ssl.SSLContext:
        """TLS 1.3 only; a client must present a certificate chaining to the federation CA."""
        ctx = _context(ssl.PROTOCOL_TLS_SERVER, self.ca_pem, self.cert_pem, self._seed())
        ctx.num_tickets = 0  # no resumption: every connection shows (and is checked for) its certificate
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """TLS 1.3 only; the broker's certificate must chain to the CA. No hostname check: the node id
        is checked against what discovery advertised (peer_node_id), names and addresses prove nothing."""
        ctx = _context(ssl.PROTOCOL_TLS_CLIENT, self.ca_pem, self.cert_pem, self._seed())
        ctx.check_hostname = False
        return ctx


def _issue_command(cert: Certificate, data_dir: Path) -> str:
    return (
        f"p2pfl federation issue {shlex.quote(cert.name or 'NAME')} --dir FEDERATION_DIR "
        f"--node-dir {shlex.quote(str(data_dir))}"
    )


def _load_pem(path: Path, what: str, hint: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise IdentityError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except ValueError:
        raise IdentityError(f"{path} is not a PEM certificate; {hint}") from None


def load_node_tls(data_dir: Path, identity: Identity, cert: Certificate, root: FederationRoot) -> NodeTls:
    """Read and check `node.crt` and `ca.crt`; any problem is one IdentityError line saying what to run."""
    data_dir = Path(data_dir)
    command = _issue_command(cert, data_dir)
    missing = [name for name in (NODE_CERT_FILE, CA_FILE) if not (data_dir / name).exists()]
    if missing:
        raise IdentityError(
            f"{data_dir} has a p2pfl certificate but no TLS files ({', '.join(missing)} missing; every "
            f"MQTT session is mutual TLS now): on the federation admin's machine run `{command}` and copy "
            f"the files it writes (certificate, federation.pub, {NODE_CERT_FILE}, {CA_FILE}) into {data_dir}"
        )
    hint = f"re-issue it with `{command}`"
    leaf = _load_pem(data_dir / NODE_CERT_FILE, "node TLS certificate", hint)
    ca = _load_pem(data_dir / CA_FILE, "federation CA certificate", hint)
    ca_key = ca.public_key()
    if not isinstance(ca_key, Ed25519PublicKey) or ca_key.public_bytes_raw() != root.public_key:
        raise IdentityError(f"{data_dir / CA_FILE} is not the CA of the federation in federation.pub; {hint}")
    leaf_key = leaf.public_key()
    if not isinstance(leaf_key, Ed25519PublicKey) or leaf_key.public_bytes_raw() != identity.verify_key_bytes:
        raise IdentityError(
            f"{data_dir / NODE_CERT_FILE} was issued for another key than this node's; {hint}"
        )
    try:
        node_id = node_id_of(leaf, root)
    except Rejected as exc:
        raise IdentityError(f"{data_dir / NODE_CERT_FILE} is not valid: {exc.detail}; {hint}") from None
    if node_id != identity.node_id:  # pragma: no cover - the key check above implies it
        raise IdentityError(f"{data_dir / NODE_CERT_FILE} names another node; {hint}")
    if leaf.not_valid_after_utc < datetime.datetime.now(tz=datetime.UTC):
        raise IdentityError(f"{data_dir / NODE_CERT_FILE} has expired; {hint}")
    pem = serialization.Encoding.PEM
    return NodeTls(identity, leaf.public_bytes(pem), ca.public_bytes(pem))
