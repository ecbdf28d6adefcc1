"""The node's own broker: the only place it publishes; neighbours subscribe here as clients.

The broker is configured explicitly (one TCP listener on the given address, only our auth and
topic plugins). Updates travel as retained parts so late subscribers get the latest one; each
update is addressed (its parts are published once per recipient on that recipient's inbox topics),
and the ACL lets a client subscribe to and receive only the owner's certificate, its own proof and
its own inbox, so only the addressed neighbour ever gets a copy.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import secrets
import socket
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from amqtt.broker import Broker
from amqtt.contexts import Action, BrokerConfig, ListenerConfig, ListenerType
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from p2pfl.errors import ConfigError, Reason, Rejected, TransportError
from p2pfl.transport.amqtt_patches import SESSION_NODE, PatchedBroker, tame_amqtt_logging
from p2pfl.transport.framing import DEFAULT_CHUNK_BYTES, split_message
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
    proof_topic,
    update_topic,
)

log = logging.getLogger(__name__)

MIN_CHUNK_BYTES = 1024

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
    """Clients may only subscribe to / receive the owner's certificate, their own proof and their own
    inbox, and may never publish."""

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
        authenticate: Callable[[str, str], str],
        on_reject: Callable[[Reason, str], None],
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        prove: Callable[[str, str], bytes] | None = None,
    ) -> None:
        """`authenticate(username, password)` returns the client's node id or raises Rejected;
        `prove(client id, its password)` returns a signed proof that we hold our certified key."""
        if not host:
            raise ConfigError("Outbox needs an explicit host address to bind (no wildcard default)")
        if not 0 <= port <= 65535:
            raise ConfigError(f"port {port} out of range")
        if chunk_bytes < MIN_CHUNK_BYTES:
            raise ConfigError(f"chunk_bytes must be at least {MIN_CHUNK_BYTES}")
        self._host = host
        self._port = port
        self.federation_id = check_level(federation_id, "federation id")
        self.node_id = check_level(node_id, "node id")
        self._authenticate = authenticate
        self._on_reject = on_reject
        self._prove = prove
        self.chunk_bytes = chunk_bytes
        self._token = secrets.token_hex(16)
        self._broker: PatchedBroker | None = None
        self._bound_port: int | None = None
        self._retained: dict[str, int] = {}  # recipient -> retained part count
        self._recipients: frozenset[str] = frozenset()  # recipients of the latest update
        self._publish_lock = asyncio.Lock()

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The actual bound port once started (useful with port 0), else the configured one."""
        return self._bound_port if self._bound_port is not None else self._port

    async def start(self) -> None:
        if self._broker is not None:
            return
        tame_amqtt_logging()
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
            broker = PatchedBroker(config)
            await broker.start()
        except Exception as exc:
            _OUTBOXES.pop(self._token, None)
            raise TransportError(self._start_failure(exc)) from None
        self._broker = broker
        self._bound_port = self._find_bound_port(broker)
        self._retained = {}
        self._recipients = frozenset()
        log.info("outbox broker listening on %s:%s", self._host, self.port)

    def _start_failure(self, exc: BaseException) -> str:
        """One line saying why the broker could not listen and which setting fixes it."""
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        where = f"port {self._port} on {self._host}"
        if isinstance(cause, socket.gaierror):
            return f"[node] host {self._host!r} is not an address of this machine ({cause.strerror}); set it to one"
        if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
            return f"{where} is in use: set [node] port to a free port (or stop the process using it)"
        if isinstance(cause, OSError) and cause.errno == errno.EADDRNOTAVAIL:
            return f"[node] host {self._host} is not an address of this machine: set it to one of its own addresses"
        if isinstance(cause, OSError) and cause.errno == errno.EACCES:
            return f"{where} needs privileges to bind: set [node] port to 1024 or above"
        detail = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause or exc)
        return f"cannot start the broker on {where}: {detail}"

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
        targets = list(dict.fromkeys(check_level(r, "recipient id") for r in recipients))
        broker = self._require_broker()
        parts = split_message(message, self.chunk_bytes) if targets else []
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
            self._reject(
                exc.reason if exc.reason is Reason.AUTH_FAILED else Reason.AUTH_FAILED,
                f"client {who}: {exc.detail or exc.reason.value}",
            )
            return False
        except Exception as exc:  # noqa: BLE001 - an auth bug must refuse, not crash the broker
            log.warning("authenticate() raised for %s", who, exc_info=True)
            self._reject(Reason.AUTH_FAILED, f"client {who}: {type(exc).__name__}")
            return False
        session.attributes[SESSION_NODE] = str(node_id)
        log.debug("client %s authenticated as %s", who, node_id)
        return True

    async def _publish_proof(self, session: Session) -> None:
        """Retain this session's proof on the client's proof topic; it arrives when the client subscribes."""
        client = session.attributes.get(SESSION_NODE)
        if self._prove is None or self._broker is None or not is_level(client):
            return
        proof = self._prove(client, str(session.password))
        await self._broker.retain_message(
            None, proof_topic(self.federation_id, self.node_id, client), proof, QOS
        )

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
        if topic.kind is Kind.CERT:
            return True
        if topic.kind is Kind.PROOF:
            return topic.target == me
        return topic.kind is Kind.INBOX and topic.target == me and me in self._recipients

    def _may_subscribe(self, topic: Topic, me: str) -> bool:
        """Only the certificate, the client's own proof and its own inbox. '+' is allowed in the
        publisher slot (subscribers need not know our id), never in the recipient slot: retained
        parts are replayed on subscribe without a per-topic RECEIVE check."""
        if topic.publisher not in (self.node_id, ANY):
            return False
        if topic.kind is Kind.CERT:
            return True
        if topic.kind is Kind.PROOF:
            return topic.target == me
        return topic.kind is Kind.INBOX and topic.target == me and topic.index in (ANY, ALL)
