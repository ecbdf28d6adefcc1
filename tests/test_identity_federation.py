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


# ---------------------------------------------------------------- the registry and the admin's commands


def _admin(tmp_path: Path, *argv: str) -> int:
    from p2pfl.cli import main as cli_main

    return cli_main([*argv])


def _cli_federation(tmp_path: Path) -> tuple[Path, list[Path]]:
    fed = tmp_path / "fed"
    assert _admin(tmp_path, "federation", "init", "--dir", str(fed)) == 0
    nodes = [tmp_path / f"h{i}" for i in range(3)]
    for node in nodes:
        assert _admin(tmp_path, "keys", "--data-dir", str(node)) == 0
    return fed, nodes


def _registry(fed: Path) -> list[dict]:
    import json

    return json.loads((fed / "registry.json").read_text())["certificates"]


def test_every_issued_certificate_is_in_the_registry_without_secrets(authority: FederationAuthority) -> None:
    from p2pfl.registry import Status

    idents = [Identity.generate() for _ in range(2)]
    certs = [
        authority.issue(f"site-{i}", ident.verify_key_bytes, ident.box_public_bytes, 3600)
        for i, ident in enumerate(idents)
    ]
    registry = authority.registry()
    assert [(e.serial, e.name, e.node_id, e.fingerprint, e.status) for e in registry.entries] == [
        (i + 1, c.name, c.node_id, c.fingerprint(), Status.ACTIVE) for i, c in enumerate(certs)
    ]
    assert registry.entries[0].cert() == certs[0]
    assert registry.entries[0].expires == certs[0].expires
    text = (authority.directory / "registry.json").read_text()
    assert (authority.directory / "root.key").read_bytes().hex() not in text
    assert _mode(authority.directory / "registry.json") == 0o644


def test_registry_refuses_a_tampered_or_foreign_file(tmp_path: Path, authority: FederationAuthority) -> None:
    import json

    ident = Identity.generate()
    authority.issue("a", ident.verify_key_bytes, ident.box_public_bytes, 3600)
    path = authority.directory / "registry.json"
    doc = json.loads(path.read_text())
    doc["certificates"][0]["name"] = "b"  # no longer the name inside its certificate
    path.write_text(json.dumps(doc))
    with pytest.raises(IdentityError, match="does not match its certificate"):
        authority.registry()
    path.write_text(json.dumps({**doc, "federation_id": "0" * 16}))
    with pytest.raises(IdentityError, match="belongs to federation"):
        authority.registry()
    path.write_text("{")
    with pytest.raises(IdentityError, match="not valid JSON"):
        authority.registry()


def test_issue_refuses_a_name_or_node_that_holds_a_current_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fed, (h0, h1, _) = _cli_federation(tmp_path)
    assert (
        _admin(tmp_path, "federation", "issue", "hospital-a", "--dir", str(fed), "--node-dir", str(h0)) == 0
    )
    capsys.readouterr()
    # another node under the same name
    assert (
        _admin(tmp_path, "federation", "issue", "hospital-a", "--dir", str(fed), "--node-dir", str(h1)) == 2
    )
    err = capsys.readouterr().err
    assert "'hospital-a' already holds a current certificate" in err
    assert (
        "federation renew hospital-a" in err and "federation revoke hospital-a" in err and "--replace" in err
    )
    # the same node under a second name
    assert (
        _admin(tmp_path, "federation", "issue", "hospital-b", "--dir", str(fed), "--node-dir", str(h0)) == 2
    )
    assert "already holds a current certificate as 'hospital-a'" in capsys.readouterr().err
    assert [e["name"] for e in _registry(fed)] == ["hospital-a"]
    # --replace is the explicit way: the old certificate is superseded, and the admin told how to end it
    old_id = _registry(fed)[0]["node_id"]
    argv = ("federation", "issue", "hospital-a", "--dir", str(fed), "--node-dir", str(h1), "--replace")
    assert _admin(tmp_path, *argv) == 0
    out = capsys.readouterr().out
    assert f"federation revoke {old_id}" in out
    assert [(e["name"], e["status"]) for e in _registry(fed)] == [
        ("hospital-a", "superseded"),
        ("hospital-a", "active"),
    ]


def test_an_expired_name_can_be_issued_again(authority: FederationAuthority) -> None:
    a, b = Identity.generate(), Identity.generate()
    authority.issue("a", a.verify_key_bytes, a.box_public_bytes, 1e-6)
    authority.issue("a", b.verify_key_bytes, b.box_public_bytes, 3600, replace=False)
    assert [e.status.value for e in authority.registry().entries] == ["superseded", "active"]


def test_a_revoked_node_is_never_certified_again(authority: FederationAuthority) -> None:
    ident = Identity.generate()
    authority.issue("a", ident.verify_key_bytes, ident.box_public_bytes, 3600)
    authority.revoke(ident.node_id)
    with pytest.raises(IdentityError, match="create new keys"):
        authority.issue("a", ident.verify_key_bytes, ident.box_public_bytes, 3600)
    with pytest.raises(IdentityError, match="revoked"):
        authority.renew("a", 3600)


def test_renew_gives_the_same_keys_a_new_expiry_and_rewrites_the_node_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from p2pfl.tls import load_node_tls

    fed, (h0, _, _) = _cli_federation(tmp_path)
    argv = ("federation", "issue", "hospital-a", "--dir", str(fed), "--node-dir", str(h0), "--ttl-days", "1")
    assert _admin(tmp_path, *argv) == 0
    old = Certificate.from_bytes((h0 / "certificate").read_bytes())
    old_tls = (h0 / "node.crt").read_bytes()
    renew = (
        "federation",
        "renew",
        "hospital-a",
        "--dir",
        str(fed),
        "--ttl-days",
        "30",
        "--node-dir",
        str(h0),
    )
    assert _admin(tmp_path, *renew) == 0
    assert "renewed hospital-a" in capsys.readouterr().out
    new = Certificate.from_bytes((h0 / "certificate").read_bytes())
    assert (new.node_id, new.sign_key, new.box_key, new.name) == (
        old.node_id,
        old.sign_key,
        old.box_key,
        old.name,
    )
    assert new.expires - new.issued == pytest.approx(30 * 86400)
    assert (h0 / "node.crt").read_bytes() != old_tls
    identity = load_or_create(h0)
    root = FederationRoot.load(fed / "federation.pub")
    assert load_node_tls(h0, identity, new, root).node_id == identity.node_id
    assert [(e["status"], e["superseded_by"]) for e in _registry(fed)] == [
        ("superseded", 2),
        ("active", None),
    ]
    assert _admin(tmp_path, "federation", "renew", "nobody", "--dir", str(fed)) == 2
    assert "no certificate named 'nobody'" in capsys.readouterr().err


def test_list_shows_names_ids_fingerprints_status_and_expiry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    fed, nodes = _cli_federation(tmp_path)
    for i, node in enumerate(nodes):
        assert (
            _admin(tmp_path, "federation", "issue", f"site-{i}", "--dir", str(fed), "--node-dir", str(node))
            == 0
        )
    assert _admin(tmp_path, "federation", "renew", "site-0", "--dir", str(fed)) == 0
    assert _admin(tmp_path, "federation", "revoke", "site-1", "--dir", str(fed)) == 0
    capsys.readouterr()
    assert _admin(tmp_path, "federation", "list", "--dir", str(fed)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["SERIAL", "NAME", "NODE", "ID", "FINGERPRINT", "STATUS", "EXPIRES"]
    rows = {line.split()[1]: line.split() for line in lines[1:-1]}
    entries = {(e["name"], e["status"]): e for e in _registry(fed)}
    assert set(rows) == {"site-0", "site-1", "site-2"}
    assert rows["site-1"][2:5] == [
        entries["site-1", "revoked"]["node_id"],
        entries["site-1", "revoked"]["fingerprint"],
        "revoked",
    ]
    assert rows["site-0"][4] == "active" and rows["site-0"][3] == entries["site-0", "active"]["fingerprint"]
    assert "1 superseded not shown" in lines[-1] and "1 node(s) revoked" in lines[-1]
    assert _admin(tmp_path, "federation", "list", "--dir", str(fed), "--all", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert [c["shown_status"] for c in doc["certificates"]] == ["superseded", "revoked", "active", "active"]
    assert all("certificate" not in c for c in doc["certificates"])


def test_revoke_by_name_or_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from p2pfl.revocation import load as load_revocations

    fed, (h0, h1, _) = _cli_federation(tmp_path)
    for name, node in (("a", h0), ("b", h1)):
        assert _admin(tmp_path, "federation", "issue", name, "--dir", str(fed), "--node-dir", str(node)) == 0
    ids = {e["name"]: e["node_id"] for e in _registry(fed)}
    capsys.readouterr()
    assert _admin(tmp_path, "federation", "revoke", "a", "--dir", str(fed)) == 0
    assert f"revoked a (node {ids['a']}): revocation list 1" in capsys.readouterr().out
    assert _admin(tmp_path, "federation", "revoke", ids["b"], "--dir", str(fed)) == 0
    root = FederationRoot.load(fed / "federation.pub")
    signed = load_revocations(fed / "revocations.bin", root)
    assert signed is not None and signed.serial == 2 and signed.revoked == set(ids.values()) == root.revoked
    assert _admin(tmp_path, "federation", "revoke", "nobody", "--dir", str(fed)) == 2
    assert "no certificate named 'nobody'" in capsys.readouterr().err


def test_show_decodes_files_and_registry_entries_against_the_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    fed, (h0, h1, _) = _cli_federation(tmp_path)
    for name, node in (("ward 7", h0), ("b", h1)):
        assert _admin(tmp_path, "federation", "issue", name, "--dir", str(fed), "--node-dir", str(node)) == 0
    cert = Certificate.from_bytes((h0 / "certificate").read_bytes())
    capsys.readouterr()

    def show(*argv: str) -> tuple[int, dict]:
        code = _admin(tmp_path, "federation", "show", *argv, "--json")
        return code, json.loads(capsys.readouterr().out)

    for target in (str(h0), str(h0 / "certificate"), "ward 7", cert.node_id):
        code, facts = show(target, "--dir", str(fed))
        assert code == 0, target
        assert facts["name"] == "ward 7" and facts["node_id"] == cert.node_id
        assert facts["federation_id"] == cert.federation_id and facts["fingerprint"] == cert.fingerprint()
        assert facts["sign_key"] == cert.sign_key.hex() and facts["box_key"] == cert.box_key.hex()
        assert (
            facts["verified"] is True
            and facts["revoked"] is False
            and facts["registry"] == "serial 1, active"
        )
    code, facts = show(str(h0 / "node.crt"))  # the TLS twin, checked against federation.pub beside it
    assert code == 0 and facts["node_id"] == cert.node_id and facts["name"] == "ward 7" and facts["verified"]
    assert _admin(tmp_path, "federation", "revoke", "ward 7", "--dir", str(fed)) == 0
    capsys.readouterr()
    code, facts = show("ward 7", "--dir", str(fed))
    assert code == 1 and facts["revoked"] is True and facts["verified"] is False
    assert facts["registry"] == "serial 1, revoked"
    code, facts = show(str(h0 / "node.crt"), "--dir", str(fed))
    assert code == 1 and facts["revoked"] is True
    other = tmp_path / "other"
    assert _admin(tmp_path, "federation", "init", "--dir", str(other)) == 0
    capsys.readouterr()
    code, facts = show(str(h1 / "certificate"), "--dir", str(other))
    assert code == 1 and "wrong_federation" in facts["problem"]
    (tmp_path / "junk").write_bytes(b"junk")
    assert _admin(tmp_path, "federation", "show", str(tmp_path / "junk")) == 2
    assert "neither a p2pfl certificate nor a node.crt" in capsys.readouterr().err
    assert _admin(tmp_path, "federation", "show", "ward 7") == 2
    assert "pass --dir" in capsys.readouterr().err
