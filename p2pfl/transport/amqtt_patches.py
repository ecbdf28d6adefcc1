"""Everything that patches or tames stock amqtt (0.12) for the outbox broker, in one place.

Each fix is targeted (no stock behaviour is copied wholesale) and says which stock behaviour it
replaces, so it can be dropped once amqtt does the right thing itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import ListenerType
from amqtt.errors import AMQTTError
from amqtt.session import Session

CONNECT_TIMEOUT_S = 10.0  # a client must send CONNECT within this after its TCP connection
SESSION_NODE = "p2pfl.node_id"  # Session.attributes key set once a client authenticated


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


class _SnapshotDict(dict):
    """amqtt's topic filter -> subscribers table, iterated over snapshots.

    Stock amqtt awaits inside `for ... in self._subscriptions.items()` (the broadcast loop awaits the
    topic plugin per subscriber) and inside `for topic in self._subscriptions` (retained replay on
    connect); a client subscribing or disconnecting meanwhile adds or removes a filter, and the loop
    dies with "dictionary changed size during iteration", taking every later broadcast with it.
    Iterating a copy (and a copy of each subscriber list) makes those loops see one consistent table.
    """

    __slots__ = ()

    def __iter__(self) -> Iterator[Any]:
        return iter(list(super().keys()))

    def items(self) -> Any:
        return [(key, list(value)) for key, value in super().items()]


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


class PatchedBroker(Broker):
    """Stock amqtt Broker with a few targeted fixes:

    - broadcast records with a short repr (stock code f-formats every record, payload included,
      even with DEBUG off: ~0.5 s per 45 MB);
    - retained messages replayed on connect only for filters this session holds (stock code replays
      every filter any client holds to every new client);
    - a client must send CONNECT within CONNECT_TIMEOUT_S;
    - sessions refused at authentication (never marked with SESSION_NODE) are dropped (stock code
      keeps them forever);
    - IPv6 literals bind (stock code passes "[::1]" with brackets to the resolver);
    - the subscription table is iterated over snapshots (stock loops await while iterating it and
      die when a client subscribes or leaves meanwhile; see _SnapshotDict).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._subscriptions = _SnapshotDict()

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

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        holders = self._subscriptions.get(subscription[0], ())
        if any(s.client_id == session.client_id for s, _ in holders):
            await super()._publish_retained_messages_for_subscription(subscription, session)

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
        try:
            return await asyncio.wait_for(
                super()._initialize_client_session(reader, writer, remote_address, remote_port),
                CONNECT_TIMEOUT_S,
            )
        except TimeoutError:
            with contextlib.suppress(Exception):
                await writer.close()
            raise AMQTTError(
                f"no CONNECT from {remote_address}:{remote_port} within {CONNECT_TIMEOUT_S:.0f} s"
            ) from None

    async def _handle_client_session(
        self, reader: Any, writer: Any, client_session: Session, *args: Any, **kwargs: Any
    ) -> None:
        try:
            await super()._handle_client_session(reader, writer, client_session, *args, **kwargs)
        finally:
            if SESSION_NODE not in client_session.attributes:
                entry = self._sessions.get(client_session.client_id or "")
                if entry is not None and entry[0] is client_session:
                    del self._sessions[client_session.client_id or ""]
