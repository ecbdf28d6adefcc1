"""Who is a member: advertised now, in an advertisement its own key signed, with a root certificate.

A node's mDNS advertisement (`p2pfl.discovery`) carries its p2pfl certificate (root-signed) and the
node's own Ed25519 signature over where it is: federation, node id, address, port, certificate
fingerprint and the time it signed. A member is a peer whose current advertisement

- carries a certificate that chains to the federation root, is not revoked or expired, names the
  advertised node id and hashes to the advertised fingerprint, and
- is signed by that certificate's key, at a time within AD_MAX_AGE_S of our clock.

Checking that costs two Ed25519 verifications per advertisement, once (`Roster` keeps the result), and
no traffic: membership is what every node reads from mDNS alone, so nodes' member sets, hence their
topologies, agree. Links (to the neighbours only) prove identity again, by mutual TLS.

Why signed advertisements rather than a certificate fetched over a TLS session to each peer's broker
(what came before): that fetch cost one TLS+MQTT session per pair of nodes (~20 ms of CPU each here), which
at 256 nodes on 2 cores was 65,280 sessions and a wall (95% certified after 45 min). A certificate in
the TXT record alone could be replayed by any host on the LAN for a departed member at an address of
its choosing; the node's signature binds the certificate to the address and port, and its age bounds
the replay of an old advertisement at the old address (a node re-signs every AD_RESIGN_S). Node clocks
must agree within AD_MAX_AGE_S; certificates already need roughly right clocks.

A member killed without a goodbye stays advertised until discovery's liveness check drops it (~2.5
min; see `p2pfl.discovery`), at about the same time on every node; meanwhile its neighbours' links
to it are down (`Mesh.reachable`), so no round waits for it. A clean stop sends mDNS goodbyes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace

import msgpack

from p2pfl.discovery import PeerAd
from p2pfl.errors import Reason, Rejected
from p2pfl.federation import Certificate, FederationRoot
from p2pfl.identity import Identity, signed_by

__all__ = ["AD_MAX_AGE_S", "AD_RESIGN_S", "Roster", "check_ad", "check_certificate", "sign_ad"]

AD_TAG = "p2pfl-ad-v2"  # domain separation: an advertisement signature signs nothing else
AD_MAX_AGE_S = 7200.0  # an advertisement signed longer ago (or later) than this is refused
AD_RESIGN_S = 1800.0  # how often a node signs its advertisement afresh
MAX_CHECKED = 4096  # advertisements whose verdict is kept (current ones are never evicted)


def _signed_bytes(ad: PeerAd) -> bytes:
    """What a node signs: where it is and which certificate it holds, and when (not `ready`, a hint)."""
    body = [AD_TAG, ad.federation_id, ad.node_id, ad.host, ad.port, ad.fingerprint, ad.signed_at]
    return msgpack.packb(body, use_bin_type=True)


def sign_ad(ad: PeerAd, identity: Identity, cert: Certificate, now: float | None = None) -> PeerAd:
    """Our advertisement with our certificate, signed by our key at `now`."""
    t = int(time.time() if now is None else now)
    unsigned = replace(ad, fingerprint=cert.fingerprint(), certificate=cert.to_bytes(), signed_at=t)
    return replace(unsigned, signature=identity.sign(_signed_bytes(unsigned)))


def check_ad(ad: PeerAd, root: FederationRoot, now: float | None = None) -> Certificate:
    """The certificate of a well-signed, current advertisement; Rejected (saying why) otherwise."""
    cert = Certificate.from_bytes(ad.certificate)
    root.verify(cert, now)
    if cert.node_id != ad.node_id:
        raise Rejected(
            Reason.PEER_IDENTITY, f"advertisement of {ad.node_id} carries the certificate of {cert.node_id}"
        )
    if cert.fingerprint() != ad.fingerprint:
        raise Rejected(
            Reason.UNCERTIFIED, f"advertisement of {ad.node_id}: certificate does not match its fingerprint"
        )
    if not signed_by(cert.sign_key, _signed_bytes(ad), ad.signature):
        raise Rejected(
            Reason.BAD_SIGNATURE,
            f"advertisement of {ad.node_id} at {ad.host}:{ad.port} is not signed by its key",
        )
    _check_age(ad, time.time() if now is None else now)
    return cert


def check_certificate(data: bytes, root: FederationRoot, proven: str | None) -> Certificate:
    """A static peer's certificate (served on its broker: no mDNS), accepted only if it chains to
    `root` and names the node the broker's TLS certificate proved (`proven`); Rejected otherwise."""
    cert = Certificate.from_bytes(data)
    root.verify(cert)
    if proven is None or cert.node_id != proven:
        raise Rejected(Reason.PEER_IDENTITY, f"certificate of {cert.node_id} on the broker of {proven}")
    return cert


def _check_age(ad: PeerAd, now: float) -> None:
    age = now - ad.signed_at
    if abs(age) > AD_MAX_AGE_S:
        when = f"{age:.0f} s ago" if age > 0 else f"{-age:.0f} s in the future"
        raise Rejected(
            Reason.STALE,
            f"advertisement of {ad.node_id} was signed {when} (at most {AD_MAX_AGE_S:.0f} s either way): "
            "a replayed old advertisement, or the clocks differ; keep node clocks in sync (NTP)",
        )


def _key(ad: PeerAd) -> tuple[object, ...]:
    """A verdict holds for exactly what was checked: every field but `ready` (not signed, a hint)."""
    return (ad.node_id, ad.federation_id, ad.name, ad.host, ad.port, ad.fingerprint) + (
        ad.certificate,
        ad.signed_at,
        ad.signature,
    )


class Roster:
    """Advertisements -> members, each advertisement checked once; pure bookkeeping, no I/O."""

    def __init__(self, root: FederationRoot) -> None:
        self.root = root
        self._ads: dict[str, PeerAd] = {}  # node id -> advertisement, as discovery has it now
        self._checked: dict[tuple[object, ...], Certificate | Rejected] = {}  # advertisement -> verdict
        self._accepted: dict[str, tuple[Certificate, int]] = {}  # advertised now: (certificate, signed at)

    def advertise(
        self, ads: Mapping[str, PeerAd], now: float | None = None
    ) -> tuple[list[Certificate], list[tuple[PeerAd, Rejected]]]:
        """Discovery's current view (node id -> advertisement); returns what was checked now for the
        first time: the certificates of the advertisements accepted, and those refused, with why."""
        t = time.time() if now is None else now
        self._ads = dict(ads)
        if len(self._checked) >= MAX_CHECKED:
            current = {_key(ad) for ad in self._ads.values()}
            self._checked = {k: v for k, v in self._checked.items() if k in current}
        accepted: list[Certificate] = []
        refused: list[tuple[PeerAd, Rejected]] = []
        self._accepted = {}
        for node_id, ad in self._ads.items():
            key = _key(ad)
            verdict = self._checked.get(key)
            if verdict is None:
                try:
                    verdict = check_ad(ad, self.root, t)
                    accepted.append(verdict)
                except Rejected as exc:
                    verdict = exc
                    refused.append((ad, exc))
                self._checked[key] = verdict
            if isinstance(verdict, Certificate):
                self._accepted[node_id] = (verdict, ad.signed_at)
        return accepted, refused

    def ad(self, node_id: str) -> PeerAd | None:
        return self._ads.get(node_id)

    def members(self, now: float | None = None) -> dict[str, Certificate]:
        """Advertised now in a well-signed advertisement no older than AD_MAX_AGE_S, certificate not
        revoked (the root may have changed since) or expired."""
        t = time.time() if now is None else now
        revoked = self.root.revoked
        return {
            node_id: cert
            for node_id, (cert, signed_at) in self._accepted.items()
            if node_id not in revoked and cert.expires >= t and abs(t - signed_at) <= AD_MAX_AGE_S
        }
