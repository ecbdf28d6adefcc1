"""Who is a member: advertised now, with a certificate that proved itself once, cached by fingerprint.

A member is a peer that discovery advertises now (mDNS: node id, address, certificate fingerprint),
whose p2pfl certificate chains to the federation root, is not revoked or expired, names the advertised
node and hashes to the advertised fingerprint, and whose broker proved that node id in a TLS handshake
at least once. Nothing here needs a live link: the mesh fetches each advertised fingerprint's
certificate once (a short session to the peer's broker, `MqttMesh`) and this roster keeps it, so
membership is what every node sees by mDNS, and nodes' member sets, hence their topologies, agree.
Closing or losing a link changes reachability (the mesh's `reachable`), never membership.

Why a one-time fetch over the peer's broker rather than the certificate in the mDNS TXT record (it
would fit: ~180 bytes, root-signed so mDNS cannot forge it): the fetch keeps membership meaning "its
broker proved the node's key over TLS", while a TXT certificate could be replayed by any host on the
LAN, for a departed (unrevoked) member, at an address of its choosing, putting ghosts into every
node's topology; static peers would need the fetch anyway. The price is one handshake per peer per
node lifetime (N-1 per node, at most 4 at a time: `mesh.FetchWindow`), not one held session per peer.

A member killed without a goodbye stays advertised until discovery's liveness check drops it (its
mDNS records expired, it stayed silent, and its broker port refuses connections: ~2.5 min; see
`p2pfl.discovery`), at about the same time on every node; meanwhile its neighbours' links to it are
down (`Mesh.reachable`), so no round waits for it. A clean stop sends mDNS goodbyes: gone at once.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from p2pfl.discovery import PeerAd
from p2pfl.errors import Reason, Rejected
from p2pfl.federation import Certificate, FederationRoot

__all__ = ["Roster", "check_certificate"]

MAX_CACHED = 4096  # certificates kept by fingerprint (a federation's members, past and present)


def check_certificate(
    data: bytes, root: FederationRoot, proven: str | None, fingerprint: str | None
) -> Certificate:
    """The p2pfl certificate a broker serves, accepted only if it chains to `root`, names the node the
    broker's TLS certificate proved (`proven`) and matches the advertised `fingerprint` (when one was
    advertised); Rejected otherwise."""
    cert = Certificate.from_bytes(data)
    root.verify(cert)
    if proven is None or cert.node_id != proven:
        raise Rejected(Reason.PEER_IDENTITY, f"certificate of {cert.node_id} on the broker of {proven}")
    if fingerprint is not None and cert.fingerprint() != fingerprint:
        raise Rejected(Reason.UNCERTIFIED, "certificate does not match the advertised fingerprint")
    return cert


class Roster:
    """Advertisements plus proven certificates -> members; pure bookkeeping, no I/O."""

    def __init__(self, root: FederationRoot) -> None:
        self.root = root
        self._ads: dict[str, PeerAd] = {}  # node id -> advertisement, as discovery has it now
        self._certs: dict[str, Certificate] = {}  # fingerprint -> certificate that proved itself

    def advertise(self, ads: Mapping[str, PeerAd]) -> None:
        """Discovery's current view (node id -> advertisement)."""
        self._ads = dict(ads)

    def ad(self, node_id: str) -> PeerAd | None:
        return self._ads.get(node_id)

    def learn(self, cert: Certificate) -> bool:
        """Keep a certificate checked by `check_certificate`; True if it was new."""
        fingerprint = cert.fingerprint()
        if fingerprint in self._certs:
            return False
        if len(self._certs) >= MAX_CACHED:
            advertised = {ad.fingerprint for ad in self._ads.values()}
            self._certs = {fp: c for fp, c in self._certs.items() if fp in advertised}
        self._certs[fingerprint] = cert
        return True

    def unknown(self) -> list[PeerAd]:
        """Advertised peers whose certificate we have not obtained yet (to fetch, once each)."""
        return [ad for ad in self._ads.values() if ad.fingerprint not in self._certs]

    def members(self, now: float | None = None) -> dict[str, Certificate]:
        """Advertised now, certificate known, naming the advertised node, not revoked, not expired."""
        t = time.time() if now is None else now
        found: dict[str, Certificate] = {}
        for node_id, ad in self._ads.items():
            cert = self._certs.get(ad.fingerprint)
            if cert is None or cert.node_id != node_id or node_id in self.root.revoked:
                continue
            if cert.expires < t:
                continue
            found[node_id] = cert
        return found
