"""`p2pfl federation init | issue | renew | revoke | list | show`: the federation admin's commands.

    p2pfl federation init --dir FED
    p2pfl federation issue NAME --dir FED --node-dir DIR [--ttl-days N] [--replace]
    p2pfl federation renew NAME --dir FED [--ttl-days N] [--node-dir DIR]
    p2pfl federation revoke NAME_OR_ID --dir FED
    p2pfl federation list --dir FED [--all] [--json]
    p2pfl federation show PATH_OR_NAME [--dir FED] [--json]

FED holds root.key (secret: init, issue, renew and revoke need it) and the public files federation.pub,
ca.crt, registry.json (every issued certificate) and revocations.bin (the root-signed revocation list
nodes pass to each other). `list` and `show` read only the public files.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pfl.errors import P2PFLError

if TYPE_CHECKING:
    from p2pfl.federation import Certificate, FederationRoot

__all__ = ["DAY", "PUBLIC_KEYS", "add_commands", "describe"]

DAY = 86400.0
PUBLIC_KEYS = "node.pub"  # what `p2pfl keys` exports: the only file a node sends the admin


def _date(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def _public_keys(node_dir: Path) -> tuple[bytes, bytes]:
    """The node's public keys: from node.pub when only that was handed over, else from (new) key files."""
    from p2pfl.identity import load_or_create

    if (node_dir / PUBLIC_KEYS).exists() and not (node_dir / "signing.key").exists():
        try:
            keys = json.loads((node_dir / PUBLIC_KEYS).read_text())
            return bytes.fromhex(keys["sign_key"]), bytes.fromhex(keys["box_key"])
        except (ValueError, KeyError, TypeError) as exc:
            raise P2PFLError(f"{node_dir / PUBLIC_KEYS} is not a `p2pfl keys` file: {exc}") from exc
    identity = load_or_create(node_dir)
    return identity.verify_key_bytes, identity.box_public_bytes


def _public_root(directory: Path) -> FederationRoot:
    """The federation's root with every revocation the admin signed (no secret key needed)."""
    from p2pfl import revocation
    from p2pfl.federation import FEDERATION_FILE, FederationRoot

    root = FederationRoot.load(directory / FEDERATION_FILE)
    signed = revocation.load(directory / revocation.REVOCATION_FILE, root)
    return signed.apply(root) if signed is not None else root


# -- init / issue / renew / revoke --------------------------------------------------------------------


def init_command(args: argparse.Namespace) -> int:
    from p2pfl.federation import ROOT_KEY_FILE, FederationAuthority

    directory = Path(args.dir)
    if (directory / ROOT_KEY_FILE).exists():
        raise P2PFLError(f"{directory} already holds a federation root key; pick another --dir")
    authority = FederationAuthority.create(directory)
    print(
        f"federation {authority.root.federation_id} created in {directory} (root key, federation.pub, ca.crt)"
    )
    print(
        f"keep {directory / ROOT_KEY_FILE} offline; `p2pfl federation issue` gives every node what it needs"
    )
    return 0


def _issued_line(verb: str, cert: Certificate, node_dir: Path | None) -> str:
    days = (cert.expires - cert.issued) / DAY
    where = f" into {node_dir}: certificate, federation.pub, node.crt (TLS), ca.crt" if node_dir else ""
    return (
        f"{verb} {cert.name} (node {cert.node_id}, fingerprint {cert.fingerprint()}), valid {days:g} days "
        f"until {_date(cert.expires)}{where}"
    )


def issue_command(args: argparse.Namespace) -> int:
    from p2pfl.federation import FederationAuthority

    authority = FederationAuthority.load(Path(args.dir))  # creates the CA file of an older federation
    node_dir = Path(args.node_dir)
    sign_key, box_key = _public_keys(node_dir)
    held = authority.registry().active(args.name)
    cert = authority.issue(
        args.name, sign_key, box_key, args.ttl_days * DAY, node_dir=node_dir, replace=args.replace
    )
    print(_issued_line("issued", cert, node_dir))
    if held is not None and held.node_id != cert.node_id:
        print(
            f"superseded {held.name}'s certificate for node {held.node_id}; it stays valid until "
            f"{_date(held.expires)}: if those keys are lost or stolen, run "
            f"`p2pfl federation revoke {held.node_id} --dir {args.dir}`"
        )
    return 0


def renew_command(args: argparse.Namespace) -> int:
    from p2pfl.federation import FederationAuthority

    authority = FederationAuthority.load(Path(args.dir))
    node_dir = Path(args.node_dir) if args.node_dir else None
    cert = authority.renew(args.name, args.ttl_days * DAY, node_dir=node_dir)
    print(_issued_line("renewed", cert, node_dir))
    if node_dir is None:
        print(
            f"the node still holds its old certificate: run again with --node-dir, or "
            f"`p2pfl federation issue {args.name} --replace --dir {args.dir} --node-dir DATA_DIR`, "
            "and copy certificate and node.crt to the node"
        )
    return 0


def revoke_command(args: argparse.Namespace) -> int:
    from p2pfl.federation import FederationAuthority
    from p2pfl.revocation import REVOCATION_FILE

    authority = FederationAuthority.load(Path(args.dir))
    node_id = authority.resolve(args.target)
    names = sorted({e.name for e in authority.registry().by_node(node_id)})
    signed = authority.revoke(node_id)
    who = f"{', '.join(names)} (node {node_id})" if names else f"node {node_id}"
    print(
        f"revoked {who}: revocation list {signed.serial} ({len(signed.revoked)} node(s)) in "
        f"{Path(args.dir) / REVOCATION_FILE}"
    )
    print(
        f"copy {REVOCATION_FILE} into any running node's data dir (next to federation.pub): it adopts it at "
        "its next round, drops the revoked node and offers the list to its neighbours, which pass it on; "
        "nodes issued from now on get it with their files"
    )
    return 0


# -- list / show --------------------------------------------------------------------------------------


def list_command(args: argparse.Namespace) -> int:
    from p2pfl.registry import REGISTRY_FILE, Registry, Status

    directory = Path(args.dir)
    root = _public_root(directory)
    registry = Registry.load(directory / REGISTRY_FILE, root.federation_id)
    now = time.time()
    entries = [e for e in registry.entries if args.all or e.status is not Status.SUPERSEDED]
    if args.json:
        rows = [{**e.to_json(), "shown_status": e.shown_status(now)} for e in entries]
        for doc in rows:
            doc.pop("certificate")
        print(json.dumps({"federation_id": root.federation_id, "certificates": rows}, indent=1))
        return 0
    header: tuple[str, ...] = ("SERIAL", "NAME", "NODE ID", "FINGERPRINT", "STATUS", "EXPIRES")
    table: list[tuple[str, ...]] = [header] + [
        (str(e.serial), e.name, e.node_id, e.fingerprint, e.shown_status(now), _date(e.expires))
        for e in entries
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    hidden = len(registry.entries) - len(entries)
    note = f"; {hidden} superseded not shown (--all)" if hidden else ""
    print(
        f"federation {root.federation_id}: {len(entries)} certificate(s){note}; "
        f"{len(root.revoked)} node(s) revoked"
    )
    return 0


def describe(cert: Certificate, root: FederationRoot | None, now: float | None = None) -> dict[str, Any]:
    """What `show` prints about a p2pfl certificate, checked against `root` when there is one."""
    from p2pfl.errors import Rejected

    t = time.time() if now is None else now
    facts: dict[str, Any] = {
        "name": cert.name,
        "node_id": cert.node_id,
        "federation_id": cert.federation_id,
        "fingerprint": cert.fingerprint(),
        "sign_key": cert.sign_key.hex(),
        "box_key": cert.box_key.hex(),
        "issued": _date(cert.issued),
        "expires": _date(cert.expires),
        "expired": t > cert.expires,
    }
    return {**facts, **_verdict(root, lambda r: r.verify(cert, now=t), cert.node_id, Rejected)}


def _verdict(
    root: FederationRoot | None, check: Any, node_id: str, rejected: type[Exception]
) -> dict[str, Any]:
    if root is None:
        return {
            "revoked": None,
            "verified": None,
            "problem": "no federation.pub to check against: pass --dir",
        }
    try:
        check(root)
    except rejected as exc:
        return {"revoked": node_id in root.revoked, "verified": False, "problem": str(exc)}
    return {"revoked": node_id in root.revoked, "verified": True, "problem": None}


def _describe_x509(pem: bytes, root: FederationRoot | None) -> dict[str, Any]:
    """What `show` prints about a node's TLS certificate (node.crt)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.x509.oid import NameOID

    from p2pfl.errors import Rejected
    from p2pfl.identity import node_id_for
    from p2pfl.tls import node_id_of

    try:
        leaf = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise P2PFLError("not a PEM certificate") from None
    key = leaf.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise P2PFLError("not a p2pfl node certificate (its key is not Ed25519)")

    def attr(oid: Any) -> str:
        values = leaf.subject.get_attributes_for_oid(oid)
        return str(values[0].value) if values else ""

    node_id = node_id_for(key.public_bytes_raw())
    expires = leaf.not_valid_after_utc.timestamp()
    facts: dict[str, Any] = {
        "kind": "TLS certificate (node.crt)",
        "name": attr(NameOID.PSEUDONYM),
        "node_id": node_id,
        "federation_id": attr(NameOID.ORGANIZATIONAL_UNIT_NAME),
        "sign_key": key.public_bytes_raw().hex(),
        "issued": _date(leaf.not_valid_before_utc.timestamp()),
        "expires": _date(expires),
        "expired": time.time() > expires,
    }
    verdict = _verdict(root, lambda r: node_id_of(leaf, r), node_id, Rejected)
    if verdict["verified"] and facts["expired"]:
        verdict = {**verdict, "verified": False, "problem": "expired"}
    return {**facts, **verdict}


def _against(directory: Path | None) -> str | None:
    from p2pfl.revocation import REVOCATION_FILE

    if directory is None:
        return None
    signed = " + revocations.bin" if (directory / REVOCATION_FILE).exists() else ""
    return f"{directory / 'federation.pub'}{signed}"


def _show_target(args: argparse.Namespace) -> dict[str, Any]:
    """Decode a certificate file, a node data dir, or a registry entry (by name or node id)."""
    from p2pfl.federation import CERTIFICATE_FILE, FEDERATION_FILE, Certificate
    from p2pfl.registry import REGISTRY_FILE, Registry

    fed_dir = Path(args.dir) if args.dir else None
    path = Path(args.target)
    if path.exists():
        file = path / CERTIFICATE_FILE if path.is_dir() else path
        beside = file.parent
        trusted = fed_dir or (beside if (beside / FEDERATION_FILE).exists() else None)
        # with no --dir, a node's data dir: its own federation.pub and revocations.bin
        root = _public_root(trusted) if trusted else None
        data = file.read_bytes()
        if data.lstrip().startswith(b"-----BEGIN"):
            return {"file": str(file), **_describe_x509(data, root), "checked_against": _against(trusted)}
        try:
            cert = Certificate.from_bytes(data)
        except P2PFLError as exc:
            raise P2PFLError(f"{file} is neither a p2pfl certificate nor a node.crt ({exc})") from None
        facts = {"file": str(file), "kind": "p2pfl certificate", **describe(cert, root)}
        facts["checked_against"] = _against(trusted)
    else:
        if fed_dir is None:
            raise P2PFLError(
                f"{args.target} is no file; to look up a name or node id, pass --dir FEDERATION_DIR"
            )
        root = _public_root(fed_dir)
        registry = Registry.load(fed_dir / REGISTRY_FILE, root.federation_id)
        entry = registry.latest(args.target) or next(iter(reversed(registry.by_node(args.target))), None)
        if entry is None:
            raise P2PFLError(
                f"no file {args.target} and no certificate of that name or node id in {fed_dir / REGISTRY_FILE}"
            )
        cert = entry.cert()
        facts = {"kind": "p2pfl certificate (registry)", **describe(cert, root)}
        facts["checked_against"] = _against(fed_dir)
    registry_path = fed_dir / REGISTRY_FILE if fed_dir else None
    if registry_path is not None and registry_path.exists():
        registry = Registry.load(registry_path, root.federation_id if root else cert.federation_id)
        known = next((e for e in registry.entries if e.fingerprint == cert.fingerprint()), None)
        facts["registry"] = (
            f"serial {known.serial}, {known.shown_status()}" if known else "not in the registry"
        )
    return facts


def show_command(args: argparse.Namespace) -> int:
    facts = _show_target(args)
    if args.json:
        print(json.dumps(facts, indent=1))
    else:
        for key, value in facts.items():
            if key == "problem" and value is None:
                continue
            shown = (
                {True: "yes", False: "no", None: "unknown"}.get(value, value)
                if isinstance(value, bool | None)
                else value
            )
            print(f"{key.replace('_', ' '):>15}: {shown}")
    return 0 if facts.get("verified") else 1


# -- the parser ---------------------------------------------------------------------------------------


def add_commands(subparsers: Any) -> None:
    """Register `federation` and its actions on the main parser's subparsers."""
    fed = subparsers.add_parser(
        "federation", help="create a federation, certify and revoke nodes"
    ).add_subparsers(dest="action", required=True)
    init = fed.add_parser("init", help="create a federation root key")
    init.add_argument("--dir", required=True, help="where root.key, federation.pub and ca.crt go")
    init.set_defaults(func=init_command)

    issue = fed.add_parser(
        "issue",
        help="certify a node: from --node-dir/node.pub (see `p2pfl keys`), else its keys (created if missing); "
        "writes certificate, federation.pub, node.crt and ca.crt into --node-dir",
    )
    issue.add_argument("name", help="human-readable node name, unique in the federation")
    issue.add_argument("--dir", required=True, help="the federation directory from `federation init`")
    issue.add_argument("--node-dir", required=True, help="the node's data_dir")
    issue.add_argument("--ttl-days", type=float, default=365.0)
    issue.add_argument(
        "--replace",
        action="store_true",
        help="supersede the current certificate of this name (or of these keys) instead of refusing",
    )
    issue.set_defaults(func=issue_command)

    renew = fed.add_parser(
        "renew", help="a new certificate for a node's same keys with a new expiry (the old one is superseded)"
    )
    renew.add_argument("name", help="the node's name (see `federation list`)")
    renew.add_argument("--dir", required=True, help="the federation directory")
    renew.add_argument("--ttl-days", type=float, default=365.0)
    renew.add_argument("--node-dir", help="also rewrite the node's certificate and TLS files there")
    renew.set_defaults(func=renew_command)

    revoke = fed.add_parser(
        "revoke",
        help="revoke a node for good: signs a new revocation list (revocations.bin) that nodes pass on",
    )
    revoke.add_argument("target", metavar="NAME_OR_ID", help="a name from `federation list`, or a node id")
    revoke.add_argument("--dir", required=True, help="the federation directory")
    revoke.set_defaults(func=revoke_command)

    listing = fed.add_parser(
        "list", help="every issued certificate: name, node id, fingerprint, status, expiry"
    )
    listing.add_argument("--dir", required=True, help="the federation directory (public files suffice)")
    listing.add_argument("--all", action="store_true", help="include superseded certificates")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(func=list_command)

    show = fed.add_parser(
        "show",
        help="decode a certificate (file, node.crt, node data dir, or a name / node id with --dir) and "
        "check it against the root; exit 1 when it is not valid",
    )
    show.add_argument("target", metavar="PATH_OR_NAME")
    show.add_argument(
        "--dir", help="the federation directory (needed for a name; else federation.pub beside it)"
    )
    show.add_argument("--json", action="store_true", help="print JSON instead of lines")
    show.set_defaults(func=show_command)
