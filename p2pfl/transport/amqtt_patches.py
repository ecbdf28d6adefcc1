"""Everything that patches or tames stock amqtt (0.12) for the outbox broker, in one place.

Each fix is targeted (no stock behaviour is copied wholesale) and says which stock behaviour it
replaces, so it can be dropped once amqtt does the right thing itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, cast

from amqtt.adapters import StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action, ListenerType
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.publish import PublishPacket
from amqtt.session import Session
from amqtt.utils import gen_client_id

from p2pfl.transport.framing import PartView

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0  # a client must send CONNECT within this after its TCP connection
SESSION_NODE = "p2pfl.node_id"  # Session.attributes key set once a client authenticated
TLS_NODE = "p2pfl.tls_node"  # Session.attributes key: the node id its TLS certificate proved
_ADMITTED = "p2pfl.admitted"  # Session.attributes key: the auth plugins admitted this CONNECT


def as_payload(part: PartView) -> bytes:
    """A PartView as amqtt's payload argument: amqtt stores and passes payloads through untouched,
    and _write_publish writes a PartView's two pieces (its annotations say bytes)."""
    return cast(bytes, part)


async def _write_publish(self: PublishPacket, writer: Any) -> None:
    """PublishPacket.to_stream for a PartView payload: header bytes, then the body view, with no
    concatenated copy of the payload (stock to_bytes builds one per packet and recipient)."""
    data = self.payload.data if self.payload is not None else None
    if not isinstance(data, PartView):
        await _STOCK_TO_STREAM(self, writer)
        return
    variable = self.variable_header.to_bytes() if self.variable_header is not None else b""
    self.fixed_header.remaining_length = len(variable) + len(data)
    writer.write(self.fixed_header.to_bytes() + variable + data.header)
    writer.write(data.body)  # two writes, no await between: nothing interleaves on this connection
    await writer.drain()
    self.protocol_ts = datetime.now(UTC)


_STOCK_TO_STREAM = PublishPacket.to_stream
PublishPacket.to_stream = _write_publish


class TlsWriterAdapter(StreamWriterAdapter):
    """The writer of a connection whose TLS client certificate was verified, with the node id it proved.

    The broker copies that id into the session (TLS_NODE) before the auth plugins see the CONNECT.
    """

    def __init__(self, writer: asyncio.StreamWriter, node_id: str) -> None:
        super().__init__(writer)
        self.node_id = node_id


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


class _DropStartupFailure(logging.Filter):
    """Drops amqtt's "Broker startup failed" traceback: Outbox.start raises one TransportError that
    says what failed and what to do (a port in use, an address not on this machine)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "Broker startup failed"


_REFUSED_MARK = " refused by the auth plugins"


class _DropRefusedConnect(logging.Filter):
    """Drops amqtt's warning for a CONNECT the auth plugins refused: the outbox reports each refusal
    once, with its reason, and a member sending refused CONNECTs in a loop must not flood the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().endswith(_REFUSED_MARK)


class _RateLimit(logging.Filter):
    """At most one amqtt warning of a kind per RATE_LIMIT_S; the next one that passes says how many
    were held back. A member's session can make amqtt warn once per packet (a PUBACK for nothing:
    4 bytes in, ~115 bytes of log out), so without this a neighbour could fill the disk."""

    RATE_LIMIT_S = 10.0
    MAX_KINDS = 256

    def __init__(self) -> None:
        super().__init__()
        self._kinds: dict[str, tuple[float, int]] = {}  # kind -> (last passed, held back since)

    def filter(self, record: logging.LogRecord) -> bool:
        kind = f"{record.name}:{''.join(c for c in str(record.msg)[:48] if not c.isdigit())}"
        now = time.monotonic()
        last, held = self._kinds.get(kind, (-math.inf, 0))
        if now - last < self.RATE_LIMIT_S:
            self._kinds[kind] = (last, held + 1)
            return False
        if len(self._kinds) >= self.MAX_KINDS:
            self._kinds.clear()
        self._kinds[kind] = (now, 0)
        if held:
            record.msg = f"{record.msg} ({held} similar held back in the last {now - last:.0f} s)"
        return True


class _TopicTree:
    """One level of the subscription index: the filters that end here, and the next levels."""

    __slots__ = ("children", "filter")

    def __init__(self) -> None:
        self.children: dict[str, _TopicTree] = {}
        self.filter: str | None = None  # the filter whose last level is this node


class _SubscriptionTable(dict):
    """amqtt's topic filter -> subscribers table, with a topic tree so a publish finds its filters
    without scanning them all, iterated over snapshots.

    Stock `_run_broadcast` tests every filter against every published topic (`_matches`), so a
    broker's per-publish cost grew with every subscription it held, related or not. `matching(topic)`
    walks the tree instead: one step per topic level, along the exact level and the '+' / '#'
    branches, so it costs the topic's depth and the filters that match, whatever else is subscribed.

    Stock amqtt also awaits inside `for ... in self._subscriptions.items()` (the broadcast loop awaits
    the topic plugin per subscriber) and inside `for topic in self._subscriptions` (retained replay on
    connect); a client subscribing or disconnecting meanwhile adds or removes a filter, and the loop
    dies with "dictionary changed size during iteration", taking every later broadcast with it.
    Iterating a copy (and a copy of each subscriber list) makes those loops see one consistent table.
    """

    __slots__ = ("_tree",)

    def __init__(self) -> None:
        super().__init__()
        self._tree = _TopicTree()

    def __iter__(self) -> Iterator[Any]:
        return iter(list(super().keys()))

    def items(self) -> Any:
        return [(key, list(value)) for key, value in super().items()]

    def __setitem__(self, topic_filter: str, subscribers: Any) -> None:
        if topic_filter not in self:
            node = self._tree
            for level in topic_filter.split("/"):
                node = node.children.setdefault(level, _TopicTree())
            node.filter = topic_filter
        super().__setitem__(topic_filter, subscribers)

    def __delitem__(self, topic_filter: str) -> None:
        super().__delitem__(topic_filter)
        path = [self._tree]
        levels = topic_filter.split("/")
        for level in levels:
            node = path[-1].children.get(level)
            if node is None:
                return
            path.append(node)
        path[-1].filter = None
        for depth in range(len(levels), 0, -1):  # prune the branch back to where it is still used
            node = path[depth]
            if node.filter is not None or node.children:
                break
            del path[depth - 1].children[levels[depth - 1]]

    def clear(self) -> None:
        super().clear()
        self._tree = _TopicTree()

    def pop(self, *args: Any) -> Any:  # pragma: no cover - amqtt never pops; keep the tree honest
        raise NotImplementedError("delete subscriptions with del")

    def matching(self, topic: str) -> list[tuple[str, list[Any]]]:
        """(filter, subscribers snapshot) for every filter that matches `topic`, as Broker._matches
        decides it: '+' is one level, '#' the rest (the parent level included), and wildcards at the
        first level do not match topics starting with '$' [MQTT-4.7.2-1]."""
        levels = topic.split("/")
        found: list[str] = []
        nodes = [self._tree]
        for depth, level in enumerate(levels):
            following: list[_TopicTree] = []
            for node in nodes:
                wild = not (depth == 0 and topic.startswith("$"))
                rest = node.children.get("#") if wild else None
                if rest is not None and rest.filter is not None:
                    found.append(rest.filter)
                exact = node.children.get(level)
                if exact is not None:
                    following.append(exact)
                one = node.children.get("+") if wild else None
                if one is not None:
                    following.append(one)
            nodes = following
            if not nodes:
                break
        for node in nodes:
            if node.filter is not None:
                found.append(node.filter)
            rest = node.children.get("#")
            if rest is not None and rest.filter is not None:
                found.append(rest.filter)  # "a/#" matches "a"
        return [(f, list(super(_SubscriptionTable, self).__getitem__(f))) for f in dict.fromkeys(found)]


_logging_tamed = False


def tame_amqtt_logging() -> None:
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
    logging.getLogger("amqtt.broker").addFilter(_DropStartupFailure())
    logging.getLogger("amqtt.broker").addFilter(_DropRefusedConnect())
    for name in (
        "amqtt.broker",
        "amqtt.mqtt.protocol.handler",
        "amqtt.mqtt.protocol.broker_handler",
        "amqtt.session",
    ):
        logging.getLogger(name).addFilter(_RateLimit())


class PatchedBroker(Broker):
    """Stock amqtt Broker with a few targeted fixes:

    - broadcast records with a short repr (stock code f-formats every record, payload included,
      even with DEBUG off: ~0.5 s per 45 MB);
    - retained messages replayed on connect only for filters this session holds (stock code replays
      every filter any client holds to every new client);
    - a client must send CONNECT within CONNECT_TIMEOUT_S;
    - a CONNECT is authenticated before the session table is looked at, and a refused one changes
      nothing (see _initialize_client_session);
    - IPv6 literals bind (stock code passes "[::1]" with brackets to the resolver);
    - the subscription table is iterated over snapshots (stock loops await while iterating it and
      die when a client subscribes or leaves meanwhile) and indexed by topic level, so a publish
      reaches its subscribers without testing every filter (see _SubscriptionTable, _run_broadcast).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._subscriptions = _SubscriptionTable()

    async def _broadcast_message(
        self,
        session: Session | None,
        topic: str | None,
        data: bytes | bytearray | None,
        force_qos: int | None = None,
    ) -> None:
        record = _Broadcast(session=session, topic=topic, data=data)
        if force_qos is not None:
            record["qos"] = force_qos
        await self._broadcast_queue.put(record)

    async def _run_broadcast(self, running_tasks: deque[asyncio.Task[Any]]) -> None:
        """Stock `_run_broadcast`, except that the filters matching the topic come from the index
        (`_SubscriptionTable.matching`) instead of a `_matches` test against every filter held."""
        broadcast = await self._broadcast_queue.get()
        topic = broadcast["topic"]
        for _filter, subscriptions in self._subscriptions.matching(topic):
            for target_session, sub_qos in subscriptions:
                qos = broadcast.get("qos", sub_qos)
                if not await self._topic_filtering(target_session, topic=topic, action=Action.RECEIVE):
                    continue
                connected = target_session.transitions.state == "connected"
                if not connected and not target_session.clean_session and qos in (QOS_1, QOS_2):
                    # as stock (never here: the auth plugins refuse persistent sessions)
                    await self._retain_broadcast_message(broadcast, qos, target_session)
                    continue
                handler = self._get_handler(target_session) if connected else None
                if handler is not None:
                    publish = handler.mqtt_publish(topic, broadcast["data"], qos, retain=False)
                    running_tasks.append(asyncio.ensure_future(publish))

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        """Stock replay of the retained messages matching a new subscription, for filters this session
        holds, with each delivery's outcome read: stock code leaves a delivery that failed (a client
        gone before its PUBACK, as a closing link may be) to asyncio's "Task exception was
        never retrieved" traceback, 784 of them in one 128-node run."""
        topic_filter, qos = subscription
        holders = self._subscriptions.get(topic_filter, ())
        handler = self._get_handler(session)
        if handler is None or not any(s.client_id == session.client_id for s, _ in holders):
            return
        deliveries = [
            asyncio.ensure_future(
                handler.mqtt_publish(
                    retained.topic, retained.data, min(qos, retained.qos or qos), retain=True
                )
            )
            for topic, retained in list(self._retained_messages.items())
            if self._matches(topic, topic_filter)
        ]
        if deliveries:
            await asyncio.wait(deliveries)
        for task in deliveries:
            if not task.cancelled() and task.exception() is not None:
                log.debug(
                    "retained %s not delivered to %s: %r", topic_filter, session.client_id, task.exception()
                )

    async def _create_server_instance(
        self,
        listener_name: str,
        listener_type: ListenerType,
        address: str | None,
        port: int,
        ssl_context: Any,
    ) -> Any:
        if address and address.startswith("[") and address.endswith("]"):
            address = address[1:-1]  # stock amqtt hands "[::1]" to the resolver with its brackets
        return await super()._create_server_instance(listener_name, listener_type, address, port, ssl_context)

    async def _initialize_client_session(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> Any:
        """Read the CONNECT, authenticate it, and only then touch the session table.

        Stock amqtt looks up the client id first: with clean_session=1 it deletes the existing session
        of that id (subscriptions included), with clean_session=0 it copies the newcomer's will and
        credentials into it and later takes the connected owner over (publishing that will), and
        only then asks the auth plugins. So a refused CONNECT carrying a neighbour's client id cut
        the neighbour off. Here a refused CONNECT gets its CONNACK and a closed connection, and
        nothing else changes. An admitted one goes on as in stock code; the auth plugins refuse
        persistent sessions, so only the clean-session path remains.
        """
        what = f"{remote_address}:{remote_port}"
        try:
            handler, session = await asyncio.wait_for(
                BrokerProtocolHandler.init_from_connect(reader, writer, self.plugins_manager),
                CONNECT_TIMEOUT_S,
            )
        except TimeoutError:
            await _close(writer)
            raise AMQTTError(f"no CONNECT from {what} within {CONNECT_TIMEOUT_S:.0f} s") from None
        except (AMQTTError, MQTTError, NoDataError) as exc:
            await _close(writer)
            raise AMQTTError(f"no valid CONNECT from {what}: {exc}") from None
        session.attributes[TLS_NODE] = getattr(writer, "node_id", None)
        if not await super()._authenticate(session, None):
            handler.attach(session, reader, writer)  # only to send the refusal
            with contextlib.suppress(Exception):
                await handler.mqtt_connack_authorize(False)
            await _close(writer)
            raise AMQTTError(f"CONNECT from {what} (client id {session.client_id!r:.80}){_REFUSED_MARK}")
        session.attributes[_ADMITTED] = True
        if not session.clean_session:  # pragma: no cover - the auth plugins refuse these
            raise AMQTTError(f"persistent session from {what} is not supported")
        if session.client_id:
            await self._delete_session(session.client_id)  # the same node's own earlier session
        else:
            session.client_id = gen_client_id()
        session.parent = 0
        delay = self.config.get("timeout-disconnect-delay", 0)
        if session.keep_alive > 0 and isinstance(delay, int):
            session.keep_alive += delay
        return handler, session

    async def _authenticate(self, session: Session, listener: Any) -> bool:
        """Stock code authenticates again in _handle_client_session: answer with the earlier verdict."""
        return bool(session.attributes.get(_ADMITTED))


async def _close(writer: Any) -> None:
    with contextlib.suppress(Exception):
        await writer.close()
