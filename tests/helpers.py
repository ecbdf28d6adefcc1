"""Helpers shared by test modules that set up a federation by hand."""

from __future__ import annotations

from pathlib import Path

from p2pfl.federation import Certificate, FederationAuthority
from p2pfl.identity import Identity, load_or_create

YEAR = 365 * 86400.0


def certify(authority: FederationAuthority, name: str, directory: Path) -> tuple[Identity, Certificate]:
    """Keys for a node in `directory`, certified by `authority`, with the files a node reads at start."""
    identity = load_or_create(directory)
    cert = authority.issue(name, identity.verify_key_bytes, identity.box_public_bytes, YEAR)
    (directory / "certificate").write_bytes(cert.to_bytes())
    authority.root.save(directory / "federation.pub")
    return identity, cert
