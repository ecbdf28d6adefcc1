"""MQTT transport: each node's own embedded amqtt broker is its outbox; neighbours connect as clients.

Why this shape: every edge of the topology is carried by one of its two endpoints' brokers, so no
process sees traffic that is not its own. Every session is mutual TLS between federation-certified
keys (p2pfl.tls), so each side knows which node the other is before any MQTT byte. Updates travel as retained, chunked parts so late
subscribers get the latest one and no single MQTT packet is huge. Each update is addressed: its parts
are published once per recipient under `.../to/{recipient}/...`, and the broker's ACL lets a client
subscribe to (and receive) only its own inbox, so only the addressed neighbour ever gets a copy.

Modules, one job each:

- `topics`: the one builder and parser of every topic and subscription filter;
- `framing`: parts of a message (`split_message`) and their reassembly (`Reassembler`);
- `amqtt_patches`: everything that patches or tames stock amqtt;
- `outbox`: the node's own broker (`Outbox`) behind the TLS front door, with its auth and ACL plugins;
- `link`: the client link to one neighbour's broker (`PeerLink`), mutual TLS, broker identity checked.
"""

from p2pfl.transport.framing import (
    DEFAULT_CHUNK_BYTES,
    MAX_PARTS,
    PART_HEADER_BYTES,
    Reassembler,
    split_message,
)
from p2pfl.transport.link import PeerLink
from p2pfl.transport.outbox import Outbox
from p2pfl.transport.topics import QOS, cert_topic, update_topic

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "MAX_PARTS",
    "PART_HEADER_BYTES",
    "QOS",
    "Outbox",
    "PeerLink",
    "Reassembler",
    "cert_topic",
    "split_message",
    "update_topic",
]
