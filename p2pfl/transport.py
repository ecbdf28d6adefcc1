"""MQTT transport: each node's own embedded amqtt broker is its outbox; neighbours connect as clients.

Why this shape: every edge of the topology is carried by one of its two endpoints' brokers, so no
process sees traffic that is not its own. The broker is configured explicitly (one TCP listener on
the given address, only our auth and topic plugins) and patched in a few places where stock amqtt
is slow or too permissive (see `_OutboxBroker`). Updates travel as retained, chunked parts so late
subscribers get the latest one and no single MQTT packet is huge. Each update is addressed: its parts
are published once per recipient under `.../to/{recipient}/...`, and the broker's ACL lets a client
subscribe to (and receive) only its own inbox, so only the addressed neighbour ever gets a copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import struct
import weakref
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from amqtt.broker import Broker
from amqtt.contexts import Action, BrokerConfig, ListenerConfig, ListenerType
from amqtt.errors import AMQTTError
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from p2pfl.errors import ConfigError, Reason, Rejected, TransportError

log = logging.getLogger(__name__)

QOS = 1
DEFAULT_CHUNK_BYTES = 4 << 20
# Part header: magic, 16-byte message id, u32 index, u32 count, u64 total length (big endian).
PART_MAGIC = b"P2U1"
_PART = struct.Struct(">4s16sIIQ")
PART_HEADER_BYTES = _PART.size
MAX_PARTS = 1 << 16  # bounds per-message bookkeeping even for tiny parts
MAX_CERT_BYTES = 64 << 10
MAX_PUBLISHER_ID_CHARS = 64

CONNECT_TIMEOUT_S = 10.0  # broker: CONNECT must arrive; client: CONNACK must arrive
CLIENT_TIMEOUT_S = 120.0  # aiomqtt subscribe/unsubscribe wait once connected
KEEPALIVE_S = 30
BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 5.0
HEALTHY_SESSION_S = 2.0  # a session that lasted this long resets the backoff
STOP_TIMEOUT_S = 5.0
MAX_QUEUED_INCOMING = 256  # aiomqtt/paho queue bound per link (paho drops beyond it)

_SESSION_NODE = "p2pfl.node_id"  # Session.attributes key set once a client authenticated


# ---------------------------------------------------------------------------------------------
# topics


def _is_level(value: object) -> bool:
    return (isinstance(value, str) and bool(value) and not any(c in value for c in "/+#\x00")
            and not value.startswith("$"))


def _check_level(value: str, what: str) -> str:
    if not _is_level(value):
        raise ConfigError(f"{what} {value!r} cannot be used as an MQTT topic level")
    return value


def topic_prefix(federation_id: str, node_id: str) -> str:
    """Everything a node publishes lives under this prefix (ends with '/')."""
    return f"p2pfl/{federation_id}/{node_id}/"


def cert_topic(federation_id: str, node_id: str) -> str:
    return f"p2pfl/{federation_id}/{node_id}/cert"


def inbox_prefix(federation_id: str, node_id: str, recipient: str) -> str:
    """Everything `node_id` addresses to `recipient` lives under this prefix (ends with '/')."""
    return f"p2pfl/{federation_id}/{node_id}/to/{recipient}/"


def proof_topic(federation_id: str, node_id: str, client: str) -> str:
    """Where the owner answers one client session with a signed proof that it holds `node_id`'s key."""
    return f"p2pfl/{federation_id}/{node_id}/proof/{client}"


def update_topic(federation_id: str, node_id: str, recipient: str, index: int) -> str:
    """Topic of part `index` of the update `node_id` addresses to `recipient`."""
    return f"p2pfl/{federation_id}/{node_id}/to/{recipient}/{index}"


# ---------------------------------------------------------------------------------------------
# chunking


def split_message(message: bytes | bytearray | memoryview, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                  message_id: bytes | None = None) -> list[bytes]:
    """Cut one sealed message into parts of at most `chunk_bytes` payload, each with a part header.

    Parts are near-equal in size (count = ceil(total / chunk), size = ceil(total / count)), so a
    receiver can check every part's length from (count, total) alone.
    """
    total = len(message)
    if total == 0:
        raise ValueError("cannot publish an empty message")
    if chunk_bytes < 1:
        raise ValueError("chunk_bytes must be positive")
    count = -(-total // chunk_bytes)
    if count > MAX_PARTS:
        raise ValueError(f"{total} bytes in parts of {chunk_bytes} exceeds {MAX_PARTS} parts")
    size = -(-total // count)
    mid = message_id if message_id is not None else os.urandom(16)
    if len(mid) != 16:
        raise ValueError("message_id must be 16 bytes")
    view = memoryview(message).cast("B")
    parts = []
    for index in range(count):
        header = _PART.pack(PART_MAGIC, mid, index, count, total)
        parts.append(b"".join((header, view[index * size:min(total, (index + 1) * size)])))
    return parts


@dataclass
class _Partial:
    count: int
    total: int
    parts: dict[int, memoryview] = field(default_factory=dict)


class Reassembler:
    """Rebuilds whole messages from update parts, per publisher, with strict bounds.

    Holds at most `max_pending` incomplete messages per publisher (oldest dropped) and at most
    `max_publishers` publishers (least recently active dropped); remembers the last few completed
    message ids so duplicate deliveries (retained + live) do not start a new message.
    """

    def __init__(self, max_message_bytes: int, max_pending: int = 2, max_publishers: int = 8,
                 remember: int = 4) -> None:
        if max_message_bytes < 1:
            raise ValueError("max_message_bytes must be positive")
        self.max_message_bytes = max_message_bytes
        self.max_pending = max(1, max_pending)
        self.max_publishers = max(1, max_publishers)
        self._pending: OrderedDict[str, OrderedDict[bytes, _Partial]] = OrderedDict()
        self._done: OrderedDict[str, deque[bytes]] = OrderedDict()
        self._remember = max(1, remember)

    def add(self, publisher: str, part: bytes | bytearray | memoryview, index: int | None = None) -> bytes | None:
        """Take one part; return the whole message once complete, else None. Raises Rejected."""
        view = memoryview(part).cast("B")
        if len(view) < PART_HEADER_BYTES:
            raise Rejected(Reason.MALFORMED, f"update part of {len(view)} bytes is shorter than its header")
        magic, mid, idx, count, total = _PART.unpack_from(view)
        if magic != PART_MAGIC:
            raise Rejected(Reason.MALFORMED, "update part has a bad magic")
        if index is not None and index != idx:
            raise Rejected(Reason.MALFORMED, f"part index {idx} does not match its topic index {index}")
        if total > self.max_message_bytes:
            raise Rejected(Reason.OVERSIZE, f"message of {total} bytes exceeds {self.max_message_bytes}")
        if total == 0 or count == 0 or count > MAX_PARTS or count > total or idx >= count:
            raise Rejected(Reason.MALFORMED, f"bad part numbering (index {idx}, count {count}, total {total})")
        size = -(-total // count)
        last = total - (count - 1) * size
        if last <= 0:
            raise Rejected(Reason.MALFORMED, f"count {count} inconsistent with total {total}")
        body = view[PART_HEADER_BYTES:]
        expected = size if idx < count - 1 else last
        if len(body) != expected:
            raise Rejected(Reason.MALFORMED, f"part {idx}/{count} has {len(body)} bytes, expected {expected}")

        done = self._done.get(publisher)
        if done is not None and mid in done:
            return None  # duplicate delivery of a message already handed out
        messages = self._pending.get(publisher)
        if count == 1:
            if messages is not None:
                messages.pop(mid, None)
            self._mark_done(publisher, mid)
            return bytes(body)
        if messages is None:
            messages = OrderedDict()
            self._pending[publisher] = messages
            while len(self._pending) > self.max_publishers:
                old, _ = self._pending.popitem(last=False)
                self._done.pop(old, None)
        else:
            self._pending.move_to_end(publisher)
        partial = messages.get(mid)
        if partial is None:
            partial = _Partial(count, total)
            messages[mid] = partial
            while len(messages) > self.max_pending:
                messages.popitem(last=False)
        else:
            if partial.count != count or partial.total != total:
                raise Rejected(Reason.MALFORMED, "parts of one message disagree on count or length")
            messages.move_to_end(mid)
        partial.parts[idx] = body
        if len(partial.parts) < count:
            return None
        del messages[mid]
        if not messages:
            del self._pending[publisher]
        self._mark_done(publisher, mid)
        parts = partial.parts
        return b"".join([parts[i] for i in range(count)])

    def _mark_done(self, publisher: str, mid: bytes) -> None:
        done = self._done.get(publisher)
        if done is None:
            done = deque(maxlen=self._remember)
            self._done[publisher] = done
            while len(self._done) > self.max_publishers:
                self._done.popitem(last=False)
        else:
            self._done.move_to_end(publisher)
        done.append(mid)

    def pending(self, publisher: str | None = None) -> int:
        """Number of incomplete messages held (for one publisher, or in all)."""
        if publisher is not None:
            return len(self._pending.get(publisher, ()))
        return sum(len(m) for m in self._pending.values())

    def pending_bytes(self) -> int:
        return sum(len(v) for m in self._pending.values() for p in m.values() for v in p.parts.values())

    def drop_incomplete(self) -> None:
        """Drop held parts but remember completed ids, so a replayed retained message is not re-emitted."""
        self._pending.clear()

    def forget(self, publisher: str | None = None) -> None:
        """Drop held parts (all publishers if None)."""
        if publisher is None:
            self._pending.clear()
            self._done.clear()
        else:
            self._pending.pop(publisher, None)
            self._done.pop(publisher, None)


# ---------------------------------------------------------------------------------------------
# amqtt integration

# Plugins are instantiated by amqtt from a dotted path plus a plain config dict, so they find
# their Outbox through this registry, keyed by a random per-broker token in the plugin config.
_OUTBOXES: weakref.WeakValueDictionary[str, Outbox] = weakref.WeakValueDictionary()


class OutboxAuthPlugin(BaseAuthPlugin):
    """Refuses anonymous clients; asks the owning Outbox to verify username/password."""

    @dataclass
    class Config:
        outbox: str = ""

    async def authenticate(self, *, session: Session) -> bool:
        outbox = _OUTBOXES.get(self.config.outbox)
        if outbox is None or not outbox._authenticate_session(session):
            return False
        await outbox._publish_proof(session)
        return True


class OutboxTopicPlugin(BaseTopicPlugin):
    """Clients may only subscribe to / receive the owner's certificate and their own inbox, and may
    never publish."""

    @dataclass
    class Config:
        outbox: str = ""

    async def topic_filtering(self, *, session: Session | None = None, topic: str | None = None,
                              action: Action | None = None) -> bool:
        outbox = _OUTBOXES.get(self.config.outbox)
        return outbox is not None and outbox._topic_allowed(session, topic, action)


class _Broadcast(dict):
    """amqtt's broadcast record; its repr stays short because stock amqtt formats it per message."""

    __slots__ = ()

    def __repr__(self) -> str:
        data = self.get("data")
        return f"<broadcast topic={self.get('topic')!r} bytes={0 if data is None else len(data)}>"

    __str__ = __repr__


class _ShortPacketArgs(logging.Filter):
    """Stops amqtt's handler logger from formatting whole PUBLISH payloads into warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        from amqtt.mqtt.packet import MQTTPacket

        if isinstance(record.args, tuple) and any(isinstance(a, MQTTPacket) for a in record.args):
            record.args = tuple(
                f"<{type(a).__name__}>" if isinstance(a, MQTTPacket) else a for a in record.args
            )
        return True


_logging_tamed = False


def _tame_amqtt_logging() -> None:
    """amqtt logs per connection at INFO and per message at DEBUG; keep it at WARNING by default."""
    global _logging_tamed
    if _logging_tamed:
        return
    _logging_tamed = True
    for name in ("amqtt", "transitions"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)
    logging.getLogger("amqtt.mqtt.protocol.handler").addFilter(_ShortPacketArgs())


class _OutboxBroker(Broker):
    """Stock amqtt Broker with a few targeted fixes (no behaviour copied wholesale):

    - broadcast records with a short repr (stock code f-formats every record, payload included,
      even with DEBUG off: ~0.5 s per 45 MB);
    - retained messages replayed on connect only for filters this session holds (stock code replays
      every filter any client holds to every new client);
    - a client must send CONNECT within CONNECT_TIMEOUT_S;
    - sessions refused at authentication are dropped (stock code keeps them forever);
    - IPv6 literals bind (stock code passes "[::1]" with brackets to the resolver).
    """

    async def _broadcast_message(self, session: Session | None, topic: str | None,
                                 data: bytes | bytearray | None, force_qos: int | None = None) -> None:
        record = _Broadcast(session=session, topic=topic, data=data)
        if force_qos is not None:
            record["qos"] = force_qos
        await self._broadcast_queue.put(record)

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int],
                                                          session: Session) -> None:
        holders = self._subscriptions.get(subscription[0], ())
        if any(s.client_id == session.client_id for s, _ in holders):
            await super()._publish_retained_messages_for_subscription(subscription, session)

    async def _create_server_instance(self, listener_name: str, listener_type: ListenerType,
                                      address: str | None, port: int, ssl_context: Any) -> Any:
        if address and address.startswith("[") and address.endswith("]"):
            address = address[1:-1]  # stock amqtt hands "[::1]" to the resolver with its brackets
        return await super()._create_server_instance(listener_name, listener_type, address, port, ssl_context)

    async def _initialize_client_session(self, reader: Any, writer: Any, remote_address: str,
                                         remote_port: int) -> Any:
        try:
            return await asyncio.wait_for(
                super()._initialize_client_session(reader, writer, remote_address, remote_port),
                CONNECT_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(Exception):
                await writer.close()
            raise AMQTTError(f"no CONNECT from {remote_address}:{remote_port} "
                             f"within {CONNECT_TIMEOUT_S:.0f} s") from None

    async def _handle_client_session(self, reader: Any, writer: Any, client_session: Session,
                                     *args: Any, **kwargs: Any) -> None:
        try:
            await super()._handle_client_session(reader, writer, client_session, *args, **kwargs)
        finally:
            if _SESSION_NODE not in client_session.attributes:
                entry = self._sessions.get(client_session.client_id or "")
                if entry is not None and entry[0] is client_session:
                    del self._sessions[client_session.client_id or ""]


class Outbox:
    """This node's broker: the only place it publishes; neighbours subscribe here."""

    def __init__(self, host: str, port: int, federation_id: str, node_id: str,
                 authenticate: Callable[[str, str], str], on_reject: Callable[[Reason, str], None],
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 prove: Callable[[str, str], bytes] | None = None) -> None:
        if not host:
            raise ConfigError("Outbox needs an explicit host address to bind (no wildcard default)")
        if not 0 <= port <= 65535:
            raise ConfigError(f"port {port} out of range")
        if chunk_bytes < 1024:
            raise ConfigError("chunk_bytes must be at least 1024")
        self._host = host
        self._port = port
        self.federation_id = _check_level(federation_id, "federation id")
        self.node_id = _check_level(node_id, "node id")
        self._authenticate = authenticate
        self._on_reject = on_reject
        self._prove = prove  # (client id, its password) -> signed proof that we hold our certified key
        self.chunk_bytes = chunk_bytes
        self._prefix = topic_prefix(federation_id, node_id)
        self._token = secrets.token_hex(16)
        self._broker: _OutboxBroker | None = None
        self._bound_port: int | None = None
        self._retained: dict[str, int] = {}  # recipient -> retained part count
        self._recipients: frozenset[str] = frozenset()  # recipients of the latest update
        self._publish_lock = asyncio.Lock()

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The actual bound port once started (useful with port 0), else the configured one."""
        return self._bound_port if self._bound_port is not None else self._port

    @property
    def running(self) -> bool:
        return self._broker is not None

    async def start(self) -> None:
        if self._broker is not None:
            return
        _tame_amqtt_logging()
        bind = f"[{self._host}]:{self._port}" if ":" in self._host else f"{self._host}:{self._port}"
        config = BrokerConfig(
            listeners={"default": ListenerConfig(type=ListenerType.TCP, bind=bind)},
            plugins={
                f"{__name__}.OutboxAuthPlugin": {"outbox": self._token},
                f"{__name__}.OutboxTopicPlugin": {"outbox": self._token},
            },
        )
        _OUTBOXES[self._token] = self
        try:
            broker = _OutboxBroker(config)
            await broker.start()
        except Exception as exc:
            _OUTBOXES.pop(self._token, None)
            raise TransportError(f"cannot start broker on {bind}: {exc.__cause__ or exc}") from exc
        self._broker = broker
        self._bound_port = self._find_bound_port(broker)
        self._retained = {}
        self._recipients = frozenset()
        log.info("outbox broker listening on %s:%s", self._host, self.port)

    @staticmethod
    def _find_bound_port(broker: Broker) -> int | None:
        server = broker._servers.get("default")
        sockets = getattr(getattr(server, "instance", None), "sockets", None) or ()
        for sock in sockets:
            return int(sock.getsockname()[1])
        return None

    async def stop(self) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            try:
                await broker.shutdown()
            except Exception:  # noqa: BLE001 - shutting down must not raise into the node
                log.warning("outbox broker shutdown was not clean", exc_info=True)
        _OUTBOXES.pop(self._token, None)
        self._bound_port = None
        self._retained = {}
        self._recipients = frozenset()

    # -- publishing ------------------------------------------------------------------------------

    def _require_broker(self) -> _OutboxBroker:
        if self._broker is None:
            raise TransportError("outbox is not started")
        return self._broker

    async def publish_certificate(self, cert_bytes: bytes) -> None:
        broker = self._require_broker()
        topic = cert_topic(self.federation_id, self.node_id)
        data = bytes(cert_bytes)
        await broker.retain_message(None, topic, data, QOS)
        await broker.internal_message_broadcast(topic, data, QOS)

    async def publish_update(self, message: bytes, recipients: Sequence[str]) -> int:
        """Publish the latest sealed update to each recipient's inbox as retained parts.

        The message is split once; every recipient's topics carry the same part objects (no
        copies). Retained parts left over from an earlier, larger message are cleared, and so is
        everything retained for recipients of the previous call that are not recipients now (an
        ex-neighbour must not keep getting an old model). Returns the number of parts per
        recipient (0 for no recipients: then the call only clears).
        """
        if isinstance(recipients, (str, bytes)):
            raise TypeError("recipients must be a sequence of node ids, not a single string")
        targets = list(dict.fromkeys(_check_level(r, "recipient id") for r in recipients))
        broker = self._require_broker()
        parts = split_message(message, self.chunk_bytes) if targets else []
        fed, node = self.federation_id, self.node_id
        async with self._publish_lock:
            # From now on only these receive live parts (also ones still queued in the broker).
            self._recipients = frozenset(targets)
            retained = self._retained  # counts stay an upper bound throughout, even if cancelled
            for recipient in targets:
                before = retained.get(recipient, 0)
                retained[recipient] = max(before, len(parts))
                for index, part in enumerate(parts):
                    await broker.retain_message(None, update_topic(fed, node, recipient, index), part, QOS)
                for index in range(len(parts), before):
                    await broker.retain_message(None, update_topic(fed, node, recipient, index), b"", None)
                retained[recipient] = len(parts)
            for recipient in [r for r in retained if r not in self._recipients]:
                for index in range(retained[recipient]):
                    await broker.retain_message(None, update_topic(fed, node, recipient, index), b"", None)
                del retained[recipient]
            # part-major order, so every recipient progresses at the same pace
            for index, part in enumerate(parts):
                for recipient in targets:
                    await broker.internal_message_broadcast(update_topic(fed, node, recipient, index), part, QOS)
        return len(parts)

    # -- plugin callbacks ------------------------------------------------------------------------

    def _authenticate_session(self, session: Session) -> bool:
        who = f"{session.remote_address}:{session.remote_port}"
        if not session.username or not session.password:
            self._reject(Reason.AUTH_FAILED, f"anonymous client {who} refused")
            return False
        if not session.clean_session:
            # amqtt never expires persistent sessions: each would queue every later update forever,
            # and a reused client id would inherit another client's subscriptions.
            self._reject(Reason.AUTH_FAILED, f"client {who} asked for a persistent session (clean_session=0)")
            return False
        try:
            node_id = self._authenticate(session.username, session.password)
        except Rejected as exc:
            self._reject(exc.reason if exc.reason is Reason.AUTH_FAILED else Reason.AUTH_FAILED,
                         f"client {who}: {exc.detail or exc.reason.value}")
            return False
        except Exception as exc:  # noqa: BLE001 - an auth bug must refuse, not crash the broker
            log.warning("authenticate() raised for %s", who, exc_info=True)
            self._reject(Reason.AUTH_FAILED, f"client {who}: {type(exc).__name__}")
            return False
        session.attributes[_SESSION_NODE] = str(node_id)
        log.debug("client %s authenticated as %s", who, node_id)
        return True

    async def _publish_proof(self, session: Session) -> None:
        """Retain this session's proof on the client's proof topic; it arrives when the client subscribes."""
        client = session.attributes.get(_SESSION_NODE)
        if self._prove is None or self._broker is None or not _is_level(client):
            return
        proof = self._prove(client, str(session.password))
        await self._broker.retain_message(None, proof_topic(self.federation_id, self.node_id, client), proof, QOS)

    def _reject(self, reason: Reason, detail: str) -> None:
        try:
            self._on_reject(reason, detail)
        except Exception:  # noqa: BLE001
            log.warning("on_reject callback raised", exc_info=True)

    def _topic_allowed(self, session: Session | None, topic: str | None, action: Action | None) -> bool:
        if session is None or topic is None:
            return False
        me = session.attributes.get(_SESSION_NODE)
        if not _is_level(me):
            return False  # not authenticated, or an id that cannot be an exact topic level
        if action == Action.RECEIVE:
            # Live parts only reach a current recipient: a broadcast still queued in the broker
            # when its recipient was dropped (or had not yet subscribed) is not delivered.
            return (topic in (cert_topic(self.federation_id, self.node_id),
                              proof_topic(self.federation_id, self.node_id, me))
                    or (topic.startswith(f"{self._prefix}to/{me}/") and me in self._recipients))
        if action == Action.SUBSCRIBE:
            # Only two filter shapes: the certificate and the client's own inbox. '+' is allowed in
            # the publisher slot (subscribers need not know our id), never in the recipient slot:
            # retained parts are replayed on subscribe without a per-topic RECEIVE check.
            levels = topic.split("/")
            if len(levels) < 4 or levels[0] != "p2pfl" or levels[1] != self.federation_id:
                return False
            if levels[2] not in (self.node_id, "+"):
                return False
            rest = levels[3:]
            return rest in (["cert"], ["proof", me]) or rest in (["to", me, "+"], ["to", me, "#"])
        return False  # PUBLISH: the owner publishes internally, never through a client


# ---------------------------------------------------------------------------------------------
# client side


def _connect_refusal_is_auth(exc: aiomqtt.MqttError) -> bool:
    rc = getattr(exc, "rc", None)
    value = getattr(rc, "value", rc)
    return value in (4, 5, 134, 135)


def _consume_disconnect(client: aiomqtt.Client) -> None:
    """Mark aiomqtt's disconnect future as seen.

    When the neighbour's broker goes away while the link is being stopped, aiomqtt sets an
    "Unexpected disconnection" exception that nobody awaits any more, and asyncio would log it at
    ERROR level on every ordinary shutdown.
    """
    future = getattr(client, "_disconnected", None)
    if isinstance(future, asyncio.Future) and future.done() and not future.cancelled():
        future.exception()


class PeerLink:
    """One client connection to one neighbour's broker; reconnects with backoff until stopped."""

    def __init__(self, host: str, port: int, federation_id: str, credentials: Callable[[], tuple[str, str]],
                 on_certificate: Callable[[str, bytes], None],
                 on_update: Callable[[str, bytes], Awaitable[None]],
                 on_reject: Callable[[Reason, str], None], max_message_bytes: int,
                 on_proof: Callable[[str, bytes, str], None] | None = None) -> None:
        """With `on_proof`, update parts are accepted only from `trusted_publisher`, which the owner of
        this link sets after checking the broker's proof (publisher, proof, this session's password)."""
        self.host = host
        self.port = port
        self.federation_id = _check_level(federation_id, "federation id")
        self._credentials = credentials
        self._on_certificate = on_certificate
        self._on_update = on_update
        self._on_reject = on_reject
        self._on_proof = on_proof
        self.trusted_publisher: str | None = None
        self._inbox_followed = False
        self._password = ""
        self.max_message_bytes = max_message_bytes
        self.bytes_in = 0
        self._reassembler = Reassembler(max_message_bytes)
        self._me: str | None = None  # our node id (username) on the current session
        self._client: aiomqtt.Client | None = None
        self._ready = False  # connected and initial subscriptions granted
        self._session_began: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._state = "idle"
        self._cert_filter = f"p2pfl/{federation_id}/+/cert"

    @property
    def connected(self) -> bool:
        """True once connected and subscribed (retained certificate/update are on their way)."""
        return self._ready

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        if self._task is not None and not self._task.done():
            return
        self._task = asyncio.create_task(self._run(), name=f"p2pfl-link-{self.name}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=STOP_TIMEOUT_S)
        if not done:
            log.warning("link %s did not stop within %.0f s", self.name, STOP_TIMEOUT_S)
        elif not task.cancelled() and task.exception() is not None:
            log.warning("link %s ended with %r", self.name, task.exception())
        self._client = None
        self._ready = False

    # -- connection loop ---------------------------------------------------------------------------

    def _set_state(self, state: str, detail: str) -> None:
        """Log a connection state once per change, not once per retry."""
        if state == self._state:
            return
        self._state = state
        if state == "connected":
            log.info("link %s: connected", self.name)
        elif state == "refused":
            log.warning("link %s: connection refused: %s", self.name, detail)
            self._reject(Reason.AUTH_FAILED, f"{self.name} refused our credentials: {detail}")
        else:
            log.info("link %s: %s (%s); retrying with backoff", self.name, state, detail)

    async def _run(self) -> None:
        delay = BACKOFF_MIN_S
        loop = asyncio.get_running_loop()
        while True:
            self._session_began = None
            try:
                await self._session()
                self._set_state("disconnected", "broker closed the connection")
            except MqttConnectError as exc:
                if _connect_refusal_is_auth(exc):
                    self._set_state("refused", str(exc))
                else:
                    self._set_state("unreachable", str(exc))
            except aiomqtt.MqttError as exc:
                self._set_state("disconnected" if self._state == "connected" else "unreachable", str(exc))
            except (OSError, TimeoutError) as exc:
                self._set_state("unreachable", str(exc) or type(exc).__name__)
            except Exception as exc:  # noqa: BLE001 - a bad callback or credential source must not end the link
                if self._state != "error":
                    log.warning("link %s: unexpected error", self.name, exc_info=True)
                self._set_state("error", f"{type(exc).__name__}: {exc}")
            finally:
                self._client = None
                self._ready = False
            began = self._session_began
            if began is not None and loop.time() - began >= HEALTHY_SESSION_S:
                delay = BACKOFF_MIN_S
            await asyncio.sleep(delay * random.uniform(0.75, 1.25))
            delay = min(delay * 2, BACKOFF_MAX_S)

    async def _session(self) -> None:
        """One connection: connect, subscribe (certificates and our own inbox), dispatch until it drops."""
        username, password = self._credentials()
        me = _check_level(username, "node id (username)")
        self.trusted_publisher, self._password = None, password  # every session must be proven anew
        client = aiomqtt.Client(
            self.host, self.port, username=username, password=password,
            identifier=f"p2pfl-{secrets.token_hex(8)}", clean_session=True,
            timeout=CONNECT_TIMEOUT_S, keepalive=KEEPALIVE_S,
            max_queued_incoming_messages=MAX_QUEUED_INCOMING,
        )
        try:
            async with client:
                client.timeout = CLIENT_TIMEOUT_S
                self._session_began = asyncio.get_running_loop().time()
                self._client = client
                self._reassembler.drop_incomplete()
                self._me = me
                self._inbox_followed = False
                await self._subscribe(client, [self._cert_filter, f"p2pfl/{self.federation_id}/+/proof/{me}"])
                if self._on_proof is None:
                    await self._follow_inbox(client)
                self._ready = True
                self._set_state("connected", "")
                async for message in client.messages:
                    await self._dispatch(message.topic.value, message.payload)
        finally:
            _consume_disconnect(client)

    async def _follow_inbox(self, client: aiomqtt.Client) -> None:
        """Subscribe to our inbox on this broker: with proofs, only once its owner is proven, so the
        retained update waiting there is delivered after (not before) the link trusts it."""
        if not self._inbox_followed:
            self._inbox_followed = True
            await self._subscribe(client, [f"p2pfl/{self.federation_id}/+/to/{self._me}/+"])

    async def _follow_inbox_if_trusted(self) -> None:
        if self.trusted_publisher is not None and self._client is not None:
            await self._follow_inbox(self._client)

    async def _subscribe(self, client: aiomqtt.Client, filters: list[str]) -> None:
        granted = await client.subscribe([(f, QOS) for f in filters])
        for topic_filter, code in zip(filters, granted, strict=False):
            value = getattr(code, "value", code)
            if isinstance(value, int) and value >= 0x80:
                log.warning("link %s: broker refused subscription %s", self.name, topic_filter)

    def _reject(self, reason: Reason, detail: str) -> None:
        try:
            self._on_reject(reason, detail)
        except Exception:  # noqa: BLE001
            log.warning("on_reject callback raised", exc_info=True)

    async def _dispatch(self, topic: str, payload: Any) -> None:
        if not isinstance(payload, (bytes, bytearray)):
            return  # aiomqtt decodes nothing for us; anything else is not ours
        size = len(payload)
        self.bytes_in += size
        levels = topic.split("/")
        if len(levels) < 4 or levels[0] != "p2pfl" or levels[1] != self.federation_id:
            return
        publisher = levels[2]
        if not publisher or len(publisher) > MAX_PUBLISHER_ID_CHARS:
            self._reject(Reason.MALFORMED, f"{self.name}: bad publisher id in topic")
            return
        kind = levels[3]
        try:
            if kind == "cert" and len(levels) == 4:
                if size == 0:
                    return  # retained certificate cleared
                if size > MAX_CERT_BYTES:
                    raise Rejected(Reason.OVERSIZE, f"certificate of {size} bytes from {publisher}")
                self._on_certificate(publisher, bytes(payload))
                await self._follow_inbox_if_trusted()
            elif kind == "proof" and len(levels) == 5:
                if levels[4] == self._me and self._on_proof is not None and 0 < size <= MAX_CERT_BYTES:
                    self._on_proof(publisher, bytes(payload), self._password)
                    await self._follow_inbox_if_trusted()
            elif kind == "to" and len(levels) == 6:
                if levels[4] != self._me or size == 0:
                    return  # not addressed to us (never granted by the broker), or a cleared part
                if self._on_proof is not None and publisher != self.trusted_publisher:
                    raise Rejected(Reason.UNKNOWN_SENDER, "update part before the broker proved who it is")
                index_text = levels[5]
                if not (index_text.isascii() and index_text.isdigit()) or len(index_text) > 6:
                    raise Rejected(Reason.MALFORMED, f"bad part index {index_text[:16]!r}")
                message = self._reassembler.add(publisher, payload, int(index_text))
                if message is not None:
                    await self._on_update(publisher, message)
        except Rejected as exc:
            self._reject(exc.reason, f"{self.name} ({publisher}): {exc.detail}")
        except Exception:  # noqa: BLE001 - a faulty handler must not drop the link
            log.warning("link %s: handler failed for %s", self.name, topic, exc_info=True)
