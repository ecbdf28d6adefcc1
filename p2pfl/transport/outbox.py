"""The node's own broker: the only place it publishes; neighbours subscribe here as clients.

Every connection is TLS 1.3 with a client certificate chaining to the federation CA, verified by the
front door (p2pfl.transport.frontdoor) before any MQTT byte is parsed; the verified connection and
the node id its certificate proves are then handed to amqtt through an EXTERNAL listener. The auth
plugin admits a CONNECT only with a client id derived from that node id (so nobody can take another
node's id), a clean session and no will. Updates travel as retained parts so late subscribers get the
latest one; each update is addressed (its parts are published once per recipient on that
recipient's inbox topics), and the ACL lets a client subscribe to and receive only the owner's
certificate and its own inbox, so only the addressed neighbour ever gets a copy.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from amqtt.adapters import StreamReaderAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action, BrokerConfig, ListenerConfig, ListenerType
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from p2pfl.errors import ConfigError, Reason, TransportError
from p2pfl.transport.amqtt_patches import (
    SESSION_NODE,
    TLS_NODE,
    PatchedBroker,
    TlsWriterAdapter,
    as_payload,
    tame_amqtt_logging,
)
from p2pfl.transport.framing import DEFAULT_CHUNK_BYTES, part_views
from p2pfl.transport.frontdoor import DoorLimits, FrontDoor
from p2pfl.transport.topics import (
    ALL,
    ANY,
    QOS,
    Kind,
    Topic,
    cert_topic,
    check_level,
    is_level,
    parse_topic,
    revocations_topic,
    update_topic,
)

log = logging.getLogger(__name__)

MIN_CHUNK_BYTES = 1024
LISTENER = "default"  # amqtt requires a listener of this name; ours is EXTERNAL (the front door)

# Plugins are instantiated by amqtt from a dotted path plus a plain config dict, so they find
# their Outbox through this registry, keyed by a random per-broker token in the plugin config.
_OUTBOXES: weakref.WeakValueDictionary[str, Outbox] = weakref.WeakValueDictionary()


def client_id_for(node_id: str) -> str:
    """A fresh MQTT client id for `node_id`: the broker admits only ids derived from the TLS node id."""
    return f"{node_id}-{secrets.token_hex(4)}"


def client_id_matches(client_id: object, node_id: str) -> bool:
    return isinstance(client_id, str) and (client_id == node_id or client_id.startswith(f"{node_id}-"))


class OutboxAuthPlugin(BaseAuthPlugin):
    """Admits a CONNECT only as the node its TLS certificate proved (see Outbox._authenticate_session)."""

    @dataclass
    class Config:
        outbox: str = ""

    async def authenticate(self, *, session: Session) -> bool:
        outbox = _OUTBOXES.get(self.config.outbox)
        return outbox is not None and outbox._authenticate_session(session)


class OutboxTopicPlugin(BaseTopicPlugin):
    """Clients may only subscribe to / receive the owner's certificate and their own inbox, and may
    never publish."""

    @dataclass
    class Config:
        outbox: str = ""

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool:
        outbox = _OUTBOXES.get(self.config.outbox)
        return outbox is not None and outbox._topic_allowed(session, topic, action)


class Outbox:
    """This node's broker: the only place it publishes; neighbours subscribe here."""

    def __init__(
        self,
        host: str,
        port: int,
        federation_id: str,
        node_id: str,
        *,
        ssl_context: ssl.SSLContext,
        verify: Callable[[Any], str],
        on_reject: Callable[[Reason, str], None],
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        door_limits: DoorLimits = DoorLimits(),  # noqa: B008 - frozen, shared safely
    ) -> None:
        """`ssl_context`: a server context requiring client certificates (NodeTls.server_context);
        `verify(ssl_object)` returns the node id a finished handshake proved, or raises Rejected;
        `door_limits`: the front door's caps on connections before (and after) authentication."""
        if not host:
            raise ConfigError("Outbox needs an explicit host address to bind (no wildcard default)")
        if not 0 <= port <= 65535:
            raise ConfigError(f"port {port} out of range")
        if chunk_bytes < MIN_CHUNK_BYTES:
            raise ConfigError(f"chunk_bytes must be at least {MIN_CHUNK_BYTES}")
        if ssl_context.verify_mode != ssl.CERT_REQUIRED:
            raise ConfigError("the outbox's TLS context must require client certificates")
        self._host = host
        self._port = port
        self.federation_id = check_level(federation_id, "federation id")
        self.node_id = check_level(node_id, "node id")
        self._ssl_context = ssl_context
        self._verify = verify
        self._on_reject = on_reject
        self._door_limits = door_limits
        self.chunk_bytes = chunk_bytes
        self._token = secrets.token_hex(16)
        self._broker: PatchedBroker | None = None
        self._door: FrontDoor | None = None
        self._retained: dict[str, int] = {}  # recipient -> retained part count
        self._recipients: frozenset[str] = frozenset()  # recipients of the latest update
        self._publish_lock = asyncio.Lock()

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The actual bound port once started (useful with port 0), else the configured one."""
        return self._door.port if self._door is not None else self._port

    async def start(self) -> None:
        if self._broker is not None:
            return
        tame_amqtt_logging()
        config = BrokerConfig(
            # EXTERNAL: amqtt opens no socket; the front door hands it verified TLS connections
            listeners={LISTENER: ListenerConfig(type=ListenerType.EXTERNAL, bind="front-door")},
            plugins={
                f"{__name__}.OutboxAuthPlugin": {"outbox": self._token},
                f"{__name__}.OutboxTopicPlugin": {"outbox": self._token},
            },
        )
        _OUTBOXES[self._token] = self
        broker: PatchedBroker | None = None
        try:
            broker = PatchedBroker(config)
            await broker.start()
            door = FrontDoor(
                self._host,
                self._port,
                self._ssl_context,
                verify=self._verify,
                on_session=self._on_session,
                on_reject=self._reject,
                limits=self._door_limits,
            )
            await door.start()
        except Exception as exc:
            _OUTBOXES.pop(self._token, None)
            if broker is not None:
                await _shutdown(broker)
            if isinstance(exc, TransportError):  # the door's one line: port in use, address not ours
                raise
            raise TransportError(f"cannot start the broker on {self._host}:{self._port}: {exc}") from None
        self._broker, self._door = broker, door
        self._retained = {}
        self._recipients = frozenset()
        log.info("outbox broker listening on %s:%s (mutual TLS)", self._host, self.port)

    async def _on_session(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, node_id: str
    ) -> None:
        """A connection whose client certificate proved `node_id`: amqtt serves it from here on."""
        broker = self._broker
        if broker is None:
            writer.close()
            return
        await broker.external_connected(
            StreamReaderAdapter(reader), TlsWriterAdapter(writer, node_id), LISTENER
        )

    async def stop(self) -> None:
        door, self._door = self._door, None
        broker, self._broker = self._broker, None
        if door is not None:
            try:
                await door.stop()
            except Exception:  # noqa: BLE001 - shutting down must not raise into the node
                log.warning("outbox front door did not stop cleanly", exc_info=True)
        if broker is not None:
            await _shutdown(broker)
        _OUTBOXES.pop(self._token, None)
        self._retained = {}
        self._recipients = frozenset()

    # -- publishing ------------------------------------------------------------------------------

    def _require_broker(self) -> PatchedBroker:
        if self._broker is None:
            raise TransportError("outbox is not started")
        return self._broker

    async def publish_certificate(self, cert_bytes: bytes) -> None:
        broker = self._require_broker()
        topic = cert_topic(self.federation_id, self.node_id)
        data = bytes(cert_bytes)
        await broker.retain_message(None, topic, data, QOS)
        await broker.internal_message_broadcast(topic, data, QOS)

    async def publish_revocations(self, data: bytes) -> None:
        """Offer the revocation list this node holds to every neighbour (retained, like the certificate)."""
        broker = self._require_broker()
        topic = revocations_topic(self.federation_id, self.node_id)
        await broker.retain_message(None, topic, bytes(data), QOS)
        await broker.internal_message_broadcast(topic, bytes(data), QOS)

    async def publish_update(self, message: bytes, recipients: Sequence[str]) -> int:
        """Publish the latest sealed update to each recipient's inbox as retained parts.

        The message is split once into views of its bytes (framing.PartView: the broker writes each
        part's header and body from them), and every recipient's topics carry the same part
        objects: publishing copies nothing of the message, which must not change while its parts
        are retained (until the next call). Retained parts left over from an earlier, larger message are cleared, and so is
        everything retained for recipients of the previous call that are not recipients now (an
        ex-neighbour must not keep getting an old model). Returns the number of parts per
        recipient (0 for no recipients: then the call only clears).
        """
        if isinstance(recipients, (str, bytes)):
            raise TypeError("recipients must be a sequence of node ids, not a single string")
        targets = list(dict.fromkeys(check_level(r, "recipient id") for r in recipients))
        broker = self._require_broker()
        parts = [as_payload(p) for p in part_views(message, self.chunk_bytes)] if targets else []
        async with self._publish_lock:
            # From now on only these receive live parts (also ones still queued in the broker).
            self._recipients = frozenset(targets)
            await self._retain_parts(broker, targets, parts)
            # part-major order, so every recipient progresses at the same pace
            for index, part in enumerate(parts):
                for recipient in targets:
                    await broker.internal_message_broadcast(self._part_topic(recipient, index), part, QOS)
        return len(parts)

    async def _retain_parts(self, broker: PatchedBroker, targets: list[str], parts: list[bytes]) -> None:
        """Retain `parts` for each target; clear stale parts and everything of ex-recipients."""
        retained = self._retained  # counts stay an upper bound throughout, even if cancelled
        for recipient in targets:
            before = retained.get(recipient, 0)
            retained[recipient] = max(before, len(parts))
            for index, part in enumerate(parts):
                await broker.retain_message(None, self._part_topic(recipient, index), part, QOS)
            await self._clear_parts(broker, recipient, len(parts), before)
            retained[recipient] = len(parts)
        for recipient in [r for r in retained if r not in self._recipients]:
            await self._clear_parts(broker, recipient, 0, retained[recipient])
            del retained[recipient]

    async def _clear_parts(self, broker: PatchedBroker, recipient: str, start: int, stop: int) -> None:
        for index in range(start, stop):
            await broker.retain_message(None, self._part_topic(recipient, index), b"", None)

    def _part_topic(self, recipient: str, index: int) -> str:
        return update_topic(self.federation_id, self.node_id, recipient, index)

    # -- plugin callbacks ------------------------------------------------------------------------

    def _authenticate_session(self, session: Session) -> bool:
        """Admit a CONNECT only as the node its TLS certificate proved, with a clean session and no will.

        Runs before the broker looks at its session table (see amqtt_patches), so a refusal changes
        nothing there.
        """
        who = f"{session.remote_address}:{session.remote_port}"
        node = session.attributes.get(TLS_NODE)
        if not is_level(node):
            self._reject(Reason.AUTH_FAILED, f"client {who} has no verified TLS certificate")
            return False
        if not client_id_matches(session.client_id, node):
            self._reject(
                Reason.PEER_IDENTITY,
                f"client {who} proved node {node} but asked for client id {str(session.client_id)[:80]!r}",
            )
            return False
        if not session.clean_session:
            # amqtt never expires persistent sessions: each would queue every later update forever.
            self._reject(Reason.AUTH_FAILED, f"client {node} at {who} asked for a persistent session")
            return False
        if session.will_flag:
            # a will is a publish the broker makes for the client, past the topic ACL; clients never publish
            self._reject(Reason.AUTH_FAILED, f"client {node} at {who} sent a will message")
            return False
        session.attributes[SESSION_NODE] = node
        log.debug("client %s authenticated as %s", who, node)
        return True

    def _reject(self, reason: Reason, detail: str) -> None:
        try:
            self._on_reject(reason, detail)
        except Exception:  # noqa: BLE001
            log.warning("on_reject callback raised", exc_info=True)

    def _topic_allowed(self, session: Session | None, topic: str | None, action: Action | None) -> bool:
        if session is None or topic is None:
            return False
        me = session.attributes.get(SESSION_NODE)
        if not is_level(me):
            return False  # not authenticated, or an id that cannot be an exact topic level
        parsed = parse_topic(topic)
        if parsed is None or parsed.federation_id != self.federation_id:
            return False
        if action == Action.RECEIVE:
            return self._may_receive(parsed, me)
        if action == Action.SUBSCRIBE:
            return self._may_subscribe(parsed, me)
        return False  # PUBLISH: the owner publishes internally, never through a client

    def _may_receive(self, topic: Topic, me: str) -> bool:
        """Live parts only reach a current recipient: a broadcast still queued in the broker when its
        recipient was dropped (or had not yet subscribed) is not delivered."""
        if topic.publisher != self.node_id:
            return False
        if topic.kind in (Kind.CERT, Kind.REVOCATIONS):
            return True
        return topic.kind is Kind.INBOX and topic.target == me and me in self._recipients

    def _may_subscribe(self, topic: Topic, me: str) -> bool:
        """Only the certificate and the client's own inbox. '+' is allowed in the publisher slot
        (subscribers need not know our id), never in the recipient slot: retained parts are
        replayed on subscribe without a per-topic RECEIVE check."""
        if topic.publisher not in (self.node_id, ANY):
            return False
        if topic.kind in (Kind.CERT, Kind.REVOCATIONS):
            return True
        return topic.kind is Kind.INBOX and topic.target == me and topic.index in (ANY, ALL)


async def _shutdown(broker: Broker) -> None:
    try:
        await broker.shutdown()
    except Exception:  # noqa: BLE001 - shutting down must not raise into the node
        log.warning("outbox broker shutdown was not clean", exc_info=True)
