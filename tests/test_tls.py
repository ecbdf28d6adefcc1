"""Mutual TLS rooted in the federation: the CA, node certificates, issuance, contexts and peer ids."""

from __future__ import annotations

import asyncio
import datetime
import os
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID
from helpers import certify

from p2pfl import federation as federation_mod
from p2pfl import tls
from p2pfl.cli import main as cli_main
from p2pfl.errors import IdentityError, Reason, Rejected
from p2pfl.federation import ISSUE_SKEW_S, Certificate, FederationAuthority
from p2pfl.identity import Identity, load_or_create, node_id_for

HOST = "127.0.0.1"
NODE_FILES = ["box.key", "ca.crt", "certificate", "federation.pub", "node.crt", "signing.key"]


@dataclass
class Member:
    identity: Identity
    cert: Certificate
    tls: tls.NodeTls


def member(authority: FederationAuthority, name: str, ttl_s: float = 3600.0) -> Member:
    ident = Identity.generate()
    cert = authority.issue(name, ident.verify_key_bytes, ident.box_public_bytes, ttl_s)
    return Member(ident, cert, tls.NodeTls(ident, authority.x509_pem(cert), authority.ca_pem))


@pytest.fixture()
def authority(tmp_path: Path) -> FederationAuthority:
    return FederationAuthority.create(tmp_path / "fed")


def root_seed(directory: Path) -> bytes:
    return (directory / "root.key").read_bytes()


# ---------------------------------------------------------------- the CA and node certificates


def test_the_ca_is_self_signed_by_the_root_key_and_rebuilt_identically(
    tmp_path: Path, authority: FederationAuthority
) -> None:
    path = tmp_path / "fed" / tls.CA_FILE
    first = path.read_bytes()
    ca = x509.load_pem_x509_certificate(first)
    assert ca.public_key().public_bytes_raw() == authority.root.public_key  # type: ignore[union-attr]
    assert ca.subject == ca.issuer and authority.root.federation_id in ca.subject.rfc4514_string()
    ca.verify_directly_issued_by(ca)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    # a federation made before TLS (no ca.crt) gets the very same file on its next load / issue
    path.unlink()
    FederationAuthority.load(tmp_path / "fed")
    assert path.read_bytes() == first == authority.ca_pem
    assert oct(path.stat().st_mode & 0o777) == "0o644"


def test_a_node_certificate_is_the_x509_twin_of_its_p2pfl_certificate(authority: FederationAuthority) -> None:
    m = member(authority, "hospital-a")
    leaf = x509.load_pem_x509_certificate(m.tls.cert_pem)
    ca = x509.load_pem_x509_certificate(authority.ca_pem)
    leaf.verify_directly_issued_by(ca)
    assert leaf.public_key().public_bytes_raw() == m.identity.verify_key_bytes  # type: ignore[union-attr]
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == m.identity.node_id
    assert leaf.subject.get_attributes_for_oid(NameOID.PSEUDONYM)[0].value == "hospital-a"
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uri = f"urn:p2pfl:{authority.root.federation_id}:{m.identity.node_id}"
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [uri]
    assert leaf.not_valid_after_utc.timestamp() == int(m.cert.expires)
    assert leaf.not_valid_before_utc.timestamp() == int(m.cert.issued - ISSUE_SKEW_S)
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert tls.node_id_of(leaf, authority.root) == m.identity.node_id
    # unnamed nodes get no pseudonym; long and non-ASCII names are kept whole
    for name in ("", "é" * 256):
        twin = x509.load_pem_x509_certificate(member(authority, name).tls.cert_pem)
        assert [a.value for a in twin.subject.get_attributes_for_oid(NameOID.PSEUDONYM)] == (
            [name] if name else []
        )


def test_node_id_of_refuses_what_the_root_did_not_sign_or_revoked(
    tmp_path: Path, authority: FederationAuthority
) -> None:
    m = member(authority, "a")
    leaf = x509.load_pem_x509_certificate(m.tls.cert_pem)
    with pytest.raises(Rejected) as err:
        tls.node_id_of(leaf, authority.root.with_revoked(m.identity.node_id))
    assert err.value.reason is Reason.REVOKED
    other = FederationAuthority.create(tmp_path / "other")
    with pytest.raises(Rejected) as err:
        tls.node_id_of(leaf, other.root)
    assert err.value.reason is Reason.PEER_IDENTITY and "federation root" in err.value.detail
    # signed by our root, but naming another node than its key is: the id comes from the key
    impostor = Identity.generate()
    forged_cert = Certificate(
        node_id=m.identity.node_id,
        name="a",
        federation_id=authority.root.federation_id,
        sign_key=impostor.verify_key_bytes,
        box_key=impostor.box_public_bytes,
        issued=m.cert.issued,
        expires=m.cert.expires,
        signature=b"\x00" * 64,
    )
    forged = tls.node_certificate(root_seed(tmp_path / "fed"), forged_cert)
    with pytest.raises(Rejected) as err:
        tls.node_id_of(forged, authority.root)
    assert (
        err.value.reason is Reason.PEER_IDENTITY
        and node_id_for(impostor.verify_key_bytes) in err.value.detail
    )


def test_peer_node_id_without_a_certificate_is_peer_identity() -> None:
    class NoCert:
        def getpeercert(self, binary_form: bool = False) -> bytes | None:
            return None

    class Garbage:
        def getpeercert(self, binary_form: bool = False) -> bytes:
            return b"\x30\x03\x02\x01\x00"

    for obj in (None, NoCert(), Garbage()):
        with pytest.raises(Rejected) as err:
            tls.peer_node_id(obj, federation_mod.FederationRoot(b"\x01" * 32))
        assert err.value.reason is Reason.PEER_IDENTITY


# ---------------------------------------------------------------- issuance


def test_issue_writes_everything_a_node_needs(tmp_path: Path, authority: FederationAuthority) -> None:
    identity, cert = certify(authority, "node-a", tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == NODE_FILES
    assert (tmp_path / "a" / tls.CA_FILE).read_bytes() == authority.ca_pem
    loaded = tls.load_node_tls(tmp_path / "a", identity, cert, authority.root)
    assert loaded.node_id == identity.node_id and str(identity.node_id) in repr(loaded)
    assert Certificate.from_bytes((tmp_path / "a" / "certificate").read_bytes()) == cert


def test_cli_issue_from_node_pub_writes_the_tls_files_and_upgrades_an_old_federation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fed, device, admin_copy = tmp_path / "fed", tmp_path / "device", tmp_path / "handed-over"
    assert cli_main(["federation", "init", "--dir", str(fed)]) == 0
    (fed / tls.CA_FILE).unlink()  # a federation made before TLS
    assert cli_main(["keys", "--data-dir", str(device)]) == 0
    admin_copy.mkdir()
    (admin_copy / "node.pub").write_bytes((device / "node.pub").read_bytes())
    assert cli_main(["federation", "issue", "ward 7", "--dir", str(fed), "--node-dir", str(admin_copy)]) == 0
    assert "node.crt" in capsys.readouterr().out
    assert (fed / tls.CA_FILE).exists()
    assert sorted(p.name for p in admin_copy.iterdir()) == [
        "ca.crt",
        "certificate",
        "federation.pub",
        "node.crt",
        "node.pub",
    ]
    for name in ("ca.crt", "certificate", "federation.pub", "node.crt"):  # what the admin sends back
        (device / name).write_bytes((admin_copy / name).read_bytes())
    identity = load_or_create(device)
    cert = Certificate.from_bytes((device / "certificate").read_bytes())
    root = federation_mod.FederationRoot.load(device / "federation.pub")
    assert tls.load_node_tls(device, identity, cert, root).node_id == identity.node_id


def test_a_data_dir_without_tls_files_says_what_to_run(
    tmp_path: Path, authority: FederationAuthority
) -> None:
    identity, cert = certify(authority, "ward 7", tmp_path / "a")
    (tmp_path / "a" / tls.NODE_CERT_FILE).unlink()
    with pytest.raises(IdentityError) as err:
        tls.load_node_tls(tmp_path / "a", identity, cert, authority.root)
    message = str(err.value)
    assert "\n" not in message and "node.crt missing" in message
    assert f"`p2pfl federation issue 'ward 7' --dir FEDERATION_DIR --node-dir {tmp_path / 'a'}`" in message


def test_tls_files_that_do_not_belong_to_the_node_are_refused(
    tmp_path: Path, authority: FederationAuthority
) -> None:
    identity, cert = certify(authority, "a", tmp_path / "a")
    _, _ = certify(authority, "b", tmp_path / "b")
    other = FederationAuthority.create(tmp_path / "other")
    cases = [
        (tls.NODE_CERT_FILE, (tmp_path / "b" / tls.NODE_CERT_FILE).read_bytes(), "another key"),
        (tls.CA_FILE, other.ca_pem, "not the CA"),
        (tls.NODE_CERT_FILE, b"not a certificate", "not a PEM certificate"),
    ]
    for name, data, words in cases:
        original = (tmp_path / "a" / name).read_bytes()
        (tmp_path / "a" / name).write_bytes(data)
        with pytest.raises(IdentityError, match=words) as err:
            tls.load_node_tls(tmp_path / "a", identity, cert, authority.root)
        assert "p2pfl federation issue a " in str(err.value)
        (tmp_path / "a" / name).write_bytes(original)
    tls.load_node_tls(tmp_path / "a", identity, cert, authority.root)


def test_mesh_refuses_to_start_without_tls_files(tmp_path: Path, authority: FederationAuthority) -> None:
    from p2pfl.config import NodeConfig, validate
    from p2pfl.mesh import MqttMesh
    from p2pfl.metrics import Metrics

    identity, cert = certify(authority, "a", tmp_path / "a")
    (tmp_path / "a" / tls.CA_FILE).unlink()
    cfg = NodeConfig()
    cfg.node.data_dir = str(tmp_path / "a")
    cfg.discovery.mdns = False
    with pytest.raises(IdentityError, match="ca.crt missing"):
        MqttMesh(
            validate(cfg),
            identity=identity,
            cert=cert,
            root=authority.root,
            metrics=Metrics(tmp_path / "metrics.jsonl"),
        )


@pytest.mark.slow
def test_a_node_without_tls_files_stops_with_one_line(tmp_path: Path, authority: FederationAuthority) -> None:
    certify(authority, "a", tmp_path / "a")
    (tmp_path / "a" / tls.NODE_CERT_FILE).unlink()
    (tmp_path / "a" / tls.CA_FILE).unlink()
    config = tmp_path / "node.toml"
    import socket

    with socket.socket() as s:  # a free port: without mDNS nobody could learn a port the broker picks
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    config.write_text(
        f'[node]\nname = "a"\ndata_dir = "{tmp_path / "a"}"\nport = {port}\n[discovery]\nmdns = false\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "p2pfl", "node", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert (
        "node.crt, ca.crt missing" in errors[0]
        and "p2pfl federation issue a --dir FEDERATION_DIR" in errors[0]
    )


# ---------------------------------------------------------------- handshakes


async def _handshake(
    server: tls.NodeTls, client: ssl.SSLContext, root: federation_mod.FederationRoot
) -> tuple[str, str]:
    """(id the server proved for the client, id the client proved for the server) over real TLS."""
    seen: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            seen.set_result(tls.peer_node_id(writer.get_extra_info("ssl_object"), root))
        except Rejected as exc:
            seen.set_exception(exc)
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, HOST, 0, ssl=server.server_context())
    try:
        port = srv.sockets[0].getsockname()[1]
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port, ssl=client), 10)
        try:
            broker = tls.peer_node_id(writer.get_extra_info("ssl_object"), root)
            assert await asyncio.wait_for(reader.read(2), 10) == b"ok"
            return await asyncio.wait_for(seen, 10), broker
        finally:
            writer.close()
    finally:
        srv.close()


def test_mutual_tls_proves_both_node_ids(authority: FederationAuthority) -> None:
    a, b = member(authority, "a"), member(authority, "b")
    client_side, server_side = asyncio.run(_handshake(a.tls, b.tls.client_context(), authority.root))
    assert (client_side, server_side) == (b.identity.node_id, a.identity.node_id)
    ctx = a.tls.server_context()
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_3 and ctx.verify_mode is ssl.CERT_REQUIRED
    client = a.tls.client_context()
    assert client.verify_mode is ssl.CERT_REQUIRED and not client.check_hostname


def _refused(server: tls.NodeTls, client: ssl.SSLContext, root: federation_mod.FederationRoot) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError, AssertionError, OSError)):
        asyncio.run(_handshake(server, client, root))


def test_handshakes_without_a_current_federation_certificate_fail(
    tmp_path: Path, authority: FederationAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = member(authority, "a")
    other = FederationAuthority.create(tmp_path / "other")
    stranger = member(other, "s")
    no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_cert.check_hostname = False
    no_cert.load_verify_locations(cadata=authority.ca_pem.decode())
    _refused(a.tls, no_cert, authority.root)  # no client certificate
    # a certificate of another federation, shown to a client that trusts our CA (and the reverse)
    _refused(
        a.tls,
        tls.NodeTls(stranger.identity, stranger.tls.cert_pem, authority.ca_pem).client_context(),
        authority.root,
    )
    _refused(stranger.tls, a.tls.client_context(), authority.root)
    # TLS 1.2 is not offered
    old = tls.NodeTls(a.identity, a.tls.cert_pem, authority.ca_pem).client_context()
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_2
    _refused(member(authority, "b").tls, old, authority.root)
    # a certificate that expired (issued two days ago for one day)
    monkeypatch.setattr(federation_mod.time, "time", lambda: datetime.datetime.now().timestamp() - 2 * 86400)
    expired = member(authority, "old", ttl_s=86400)
    monkeypatch.undo()
    _refused(a.tls, expired.tls.client_context(), authority.root)
    # a self-made certificate for a member's id cannot be made: the id is the key's
    key = Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, a.identity.node_id)])
    now = datetime.datetime.now(datetime.UTC)
    selfmade = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, None)
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=authority.ca_pem.decode())
    chain = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tls._load_chain(ctx, chain + selfmade.public_bytes(serialization.Encoding.PEM))
    _refused(a.tls, ctx, authority.root)


def test_a_revoked_peer_completes_tls_but_is_refused_by_id(authority: FederationAuthority) -> None:
    a, b = member(authority, "a"), member(authority, "b")
    with pytest.raises(Rejected) as err:
        asyncio.run(
            _handshake(a.tls, b.tls.client_context(), authority.root.with_revoked(b.identity.node_id))
        )
    assert err.value.reason is Reason.REVOKED


def test_the_private_key_is_loaded_without_a_file_left_behind(
    tmp_path: Path, authority: FederationAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where there is no anonymous in-memory file, a private temporary file is used and removed."""
    a, b = member(authority, "a"), member(authority, "b")
    monkeypatch.delattr(os, "memfd_create", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    client = b.tls.client_context()
    assert list(tmp_path.iterdir()) == [tmp_path / "fed"]
    assert asyncio.run(_handshake(a.tls, client, authority.root)) == (b.identity.node_id, a.identity.node_id)
