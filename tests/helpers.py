"""Helpers shared by test modules that set up a federation by hand."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from p2pfl.federation import Certificate, FederationAuthority
from p2pfl.identity import Identity, load_or_create
from p2pfl.round import RoundCore
from p2pfl.tls import NodeTls
from p2pfl.topology import parse_topology

YEAR = 365 * 86400.0


def certify(authority: FederationAuthority, name: str, directory: Path) -> tuple[Identity, Certificate]:
    """Keys for a node in `directory`, certified by `authority`, with the files a node reads at start
    (certificate, federation.pub, and the TLS files node.crt and ca.crt)."""
    identity = load_or_create(directory)
    cert = authority.issue(
        name, identity.verify_key_bytes, identity.box_public_bytes, YEAR, node_dir=directory
    )
    return identity, cert


def node_tls(authority: FederationAuthority, identity: Identity, cert: Certificate) -> NodeTls:
    """TLS credentials for an in-memory member (no data dir): its X.509 twin and the CA."""
    return NodeTls(identity, authority.x509_pem(cert), authority.ca_pem)


def round_cores(
    tmp: Path,
    spec: dict,
    n: int,
    *,
    topology: str = "ring",
    each: Sequence[Mapping[str, object]] = (),
    **settings: object,
) -> list[RoundCore]:
    """`n` round cores of one new federation, rule "mean" unless `settings` say otherwise;
    `each[i]`, when given, adds node i's own settings."""
    authority = FederationAuthority.create(tmp / "federation")
    cores = []
    for i in range(n):
        identity, cert = certify(authority, f"node-{i}", tmp / f"n{i}")
        cores.append(
            RoundCore(
                identity=identity,
                cert=cert,
                root=authority.root,
                topology=parse_topology(topology),
                spec=spec,
                samples=10,
                **{"rule": "mean", **settings, **(each[i] if each else {})},  # type: ignore[arg-type]
            )
        )
    return cores


def members_of(cores: list[RoundCore]) -> dict[str, Certificate]:
    return {c.node_id: c.cert for c in cores}
