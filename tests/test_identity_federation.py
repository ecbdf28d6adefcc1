"""Identity files, certificates and the federation root (TLS credentials: tests/test_tls.py)."""

from __future__ import annotations

import random
import stat
from dataclasses import replace
from pathlib import Path

import msgpack
import pytest

from p2pfl.errors import IdentityError, Reason, Rejected
from p2pfl.federation import Certificate, FederationAuthority, FederationRoot
from p2pfl.identity import Identity, load_or_create, node_id_for


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture()
def authority(tmp_path: Path) -> FederationAuthority:
    return FederationAuthority.create(tmp_path / "fed")


@pytest.fixture()
def member(authority: FederationAuthority) -> tuple[Identity, Certificate]:
    ident = Identity.generate()
    return ident, authority.issue("alice", ident.verify_key_bytes, ident.box_public_bytes, ttl_s=3600)


# ---------------------------------------------------------------- identity


def test_load_or_create_writes_private_files_and_reloads(tmp_path: Path) -> None:
    data = tmp_path / "node" / "data"
    first = load_or_create(data)
    assert _mode(data) == 0o700
    for name in ("signing.key", "box.key"):
        assert _mode(data / name) == 0o600
        assert len((data / name).read_bytes()) == 32
    again = load_or_create(data)
    assert again.node_id == first.node_id
    assert again.box_public_bytes == first.box_public_bytes
    assert len(first.node_id) == 16 and int(first.node_id, 16) >= 0
    assert first.node_id == node_id_for(first.verify_key_bytes)


def test_identity_repr_hides_keys(tmp_path: Path) -> None:
    ident = load_or_create(tmp_path)
    seed_hex = (tmp_path / "signing.key").read_bytes().hex()
    box_hex = (tmp_path / "box.key").read_bytes().hex()
    text = repr(ident) + str(ident)
    assert ident.node_id in text
    assert seed_hex not in text and box_hex not in text


def test_sign_is_detached_ed25519() -> None:
    import nacl.signing

    ident = Identity.generate()
    sig = ident.sign(b"hello")
    assert len(sig) == 64
    nacl.signing.VerifyKey(ident.verify_key_bytes).verify(b"hello", sig)


def test_corrupt_key_file_is_identity_error(tmp_path: Path) -> None:
    load_or_create(tmp_path)
    (tmp_path / "box.key").write_bytes(b"short")
    with pytest.raises(IdentityError, match="corrupt"):
        load_or_create(tmp_path)


def test_missing_partner_key_is_identity_error(tmp_path: Path) -> None:
    load_or_create(tmp_path)
    (tmp_path / "box.key").unlink()
    with pytest.raises(IdentityError, match="missing"):
        load_or_create(tmp_path)


def test_loose_key_mode_is_tightened(tmp_path: Path) -> None:
    first = load_or_create(tmp_path)
    (tmp_path / "signing.key").chmod(0o644)
    assert load_or_create(tmp_path).node_id == first.node_id
    assert _mode(tmp_path / "signing.key") == 0o600


# ---------------------------------------------------------------- certificates


def test_certificate_round_trip(member: tuple[Identity, Certificate], authority: FederationAuthority) -> None:
    ident, cert = member
    assert cert.node_id == ident.node_id
    assert cert.federation_id == authority.root.federation_id
    again = Certificate.from_bytes(cert.to_bytes())
    assert again == cert
    assert len(cert.fingerprint()) == 16 and cert.fingerprint() == again.fingerprint()
    authority.root.verify(again)


def _body(cert: Certificate) -> list:
    return msgpack.unpackb(cert.to_bytes(), raw=False)


@pytest.mark.parametrize(
    "index, value",
    [
        (0, "other-tag"),
        (1, 123),  # node_id
        (2, b"name"),  # name
        (3, None),  # federation id
        (4, "k" * 32),  # sign_key as str
        (5, b"short"),  # box_key
        (6, "yesterday"),  # issued
        (7, float("nan")),  # expires
        (8, b"\x00" * 63),  # signature
        (6, True),  # bool is not a time
    ],
)
def test_certificate_wrong_field_types_are_malformed(member, index: int, value) -> None:
    body = _body(member[1])
    body[index] = value
    with pytest.raises(Rejected) as err:
        Certificate.from_bytes(msgpack.packb(body, use_bin_type=True))
    assert err.value.reason is Reason.MALFORMED


def test_certificate_garbage_is_malformed(member) -> None:
    rng = random.Random(1)
    good = member[1].to_bytes()
    samples: list = [
        b"",
        b"\xc1",
        good[:-1],
        good + b"\x00",
        msgpack.packb({"a": 1}),
        msgpack.packb(_body(member[1])[:-1]),
    ]
    samples += [rng.randbytes(rng.randrange(1, 300)) for _ in range(300)]
    samples += [
        bytes(b ^ (1 << rng.randrange(8)) if i == rng.randrange(len(good)) else b for i, b in enumerate(good))
        for _ in range(100)
    ]
    samples += ["not bytes", None, 42]
    for data in samples:
        try:
            Certificate.from_bytes(data)
        except Rejected as exc:
            assert exc.reason is Reason.MALFORMED
        except Exception as exc:  # pragma: no cover - the assertion below explains
            pytest.fail(f"from_bytes raised {type(exc).__name__} on {data!r:.60}")


def test_verify_rejections(tmp_path: Path, member, authority: FederationAuthority) -> None:
    ident, cert = member
    root = authority.root
    other = FederationAuthority.create(tmp_path / "other")
    foreign = other.issue("mallory", ident.verify_key_bytes, ident.box_public_bytes, ttl_s=3600)

    def reason(c: Certificate, r: FederationRoot = root, now: float | None = None) -> Reason:
        with pytest.raises(Rejected) as err:
            r.verify(c, now=now)
        return err.value.reason

    assert reason(foreign) is Reason.WRONG_FEDERATION
    # Same signature, edited field: the root did not sign this.
    assert reason(replace(cert, name="admin")) is Reason.UNCERTIFIED
    assert reason(replace(cert, box_key=Identity.generate().box_public_bytes)) is Reason.UNCERTIFIED
    # A genuinely root-signed certificate whose node id does not belong to its key.
    unsigned = replace(cert, node_id="0" * 16, signature=b"")
    wrong_id = replace(unsigned, signature=authority._key.sign(unsigned.signed_bytes()).signature)
    assert reason(wrong_id) is Reason.UNCERTIFIED
    assert reason(cert, now=cert.expires + 1) is Reason.EXPIRED
    assert reason(cert, now=cert.issued - 3600) is Reason.EXPIRED  # not valid yet
    assert reason(cert, r=root.with_revoked(cert.node_id)) is Reason.REVOKED
    root.verify(cert, now=cert.expires - 1)


# ---------------------------------------------------------------- federation root / authority


def test_authority_files_and_revocation(tmp_path: Path, member) -> None:
    directory = tmp_path / "fed"
    auth = FederationAuthority.load(directory)
    assert _mode(directory / "root.key") == 0o600
    assert (directory / "federation.pub").exists()
    with pytest.raises(IdentityError):
        FederationAuthority.create(directory)
    root = FederationRoot.load(directory / "federation.pub")
    assert root == auth.root and root.federation_id == auth.root.federation_id
    auth.revoke(member[1].node_id)
    reloaded = FederationRoot.load(directory / "federation.pub")
    assert member[1].node_id in reloaded.revoked
    assert FederationAuthority.load(directory).root.revoked == reloaded.revoked
    with pytest.raises(Rejected) as err:
        reloaded.verify(member[1])
    assert err.value.reason is Reason.REVOKED


def test_federation_root_json(tmp_path: Path) -> None:
    root = FederationRoot(bytes(range(32)), frozenset({"b" * 16, "a" * 16}))
    path = tmp_path / "federation.pub"
    root.save(path)
    import json

    doc = json.loads(path.read_text())
    assert doc == {"root_public_key": bytes(range(32)).hex(), "revoked": ["a" * 16, "b" * 16]}
    assert FederationRoot.load(path) == root
    for bad in (
        "{",
        "[]",
        '{"root_public_key": "zz"}',
        '{"root_public_key": "00"}',
        '{"root_public_key": "' + "00" * 32 + '", "revoked": "x"}',
    ):
        path.write_text(bad)
        with pytest.raises(IdentityError):
            FederationRoot.load(path)
    with pytest.raises(IdentityError):
        FederationRoot.load(tmp_path / "missing.pub")


def test_an_uncreatable_data_dir_is_an_identity_error(tmp_path: Path) -> None:
    """Tests run as root, so a path under a regular file stands in for a read-only location."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(
        IdentityError, match=r"cannot create data dir .*a-file/sub: Not a directory; set \[node\] data_dir"
    ):
        load_or_create(blocker / "sub")
