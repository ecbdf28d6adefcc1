"""PeerLink: this node's client connection to one neighbour's broker.

Each session is mutual TLS: the link shows this node's certificate, and right after the handshake it
reads the node id out of the broker's certificate and checks it against what discovery advertised
(a mismatch closes the session and is counted as PEER_IDENTITY). It then subscribes to its own inbox
there (and, for a static peer, known by no advertisement, to that node's certificate), rebuilds updates from their parts and hands them on; only parts published by the proven owner are
accepted. It reconnects with backoff until stopped; `down` says that its last attempt failed or its
session dropped, so a round need not wait for that neighbour.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, cast

import aiomqtt
from aiomqtt.exceptions import MqttConnectError

from p2pfl.errors import Reason, Rejected
from p2pfl.federation import MAX_CERT_BYTES
from p2pfl.revocation import MAX_REVOCATION_BYTES
from p2pfl.transport.framing import Reassembler
from p2pfl.transport.outbox import client_id_for
from p2pfl.transport.topics import (
    QOS,
    Kind,
    Topic,
    cert_topic,
    check_level,
    inbox_filter,
    parse_topic,
    part_index,
    revocations_topic,
)

log = logging.getLogger(__name__)

MAX_PUBLISHER_ID_CHARS = 64
CONNACK_TIMEOUT_S = 10.0  # the neighbour's broker must answer CONNECT within this
CLIENT_TIMEOUT_S = 120.0  # aiomqtt subscribe/unsubscribe wait once connected
KEEPALIVE_S = 30
BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 5.0
HEALTHY_SESSION_S = 2.0  # a session that lasted this long resets the backoff
STOP_TIMEOUT_S = 5.0
MAX_QUEUED_INCOMING = 256  # aiomqtt/paho queue bound per link (paho drops beyond it)
_AUTH_REFUSALS = (4, 5, 134, 135)  # CONNACK codes for bad credentials / not authorized (MQTT 3.1.1 and 5)


def _connect_refusal_is_auth(exc: aiomqtt.MqttError) -> bool:
    rc = getattr(exc, "rc", None)
    value = getattr(rc, "value", rc)
    return value in _AUTH_REFUSALS


def _is_tls_failure(exc: aiomqtt.MqttError) -> bool:
    """aiomqtt turns the ssl.SSLError of a failed handshake into a bare MqttError(str(exc))."""
    return "[SSL" in str(exc) or "SSL:" in str(exc)


def _consume_disconnect(client: aiomqtt.Client) -> None:
    """Mark aiomqtt's disconnect future as seen.

    When the neighbour's broker goes away while the link is being stopped, aiomqtt sets an
    "Unexpected disconnection" exception that nobody awaits any more, and asyncio would log it at
    ERROR level on every ordinary shutdown.
    """
    future = getattr(client, "_disconnected", None)
    if isinstance(future, asyncio.Future) and future.done() and not future.cancelled():
        future.exception()


def _close_orphan(client: aiomqtt.Client) -> None:
    """Close the socket of a connection attempt that gave up before CONNACK.

    aiomqtt raises on its CONNACK timeout but leaves paho's socket open; a late CONNACK then makes
    it a live session nobody reads or ends, holding one of the peer's per-member session slots
    (a loaded broker answers late) until the process exits. After a clean exit there is no socket."""
    if client._client.socket() is not None:
        client._client._sock_close()


def _tls_socket(client: aiomqtt.Client) -> Any:
    """The connected TLS socket under aiomqtt (paho's), to read the broker's certificate from."""
    return client._client.socket()


class PeerLink:
    """One client connection to one neighbour's broker; reconnects with backoff until stopped."""

    def __init__(
        self,
        host: str,
        port: int,
        federation_id: str,
        node_id: str,
        *,
        tls_context: ssl.SSLContext,
        identify: Callable[[Any], str],
        on_certificate: Callable[[str, bytes], None] | None,
        on_update: Callable[[str, bytes], Awaitable[None]],
        on_reject: Callable[[Reason, str], None],
        max_message_bytes: int,
        expected: str | None = None,
        on_state: Callable[[], None] | None = None,
        on_revocations: Callable[[str, bytes], None] | None = None,
    ) -> None:
        """`tls_context`: this node's client context (NodeTls.client_context); `identify(tls socket)`
                returns the node id the broker's certificate proves, or raises Rejected; `expected`: the node
                id discovery advertised for this address (None for a static peer: then only the certificate
                the broker publishes, which must be the proven node's, says who it is); `on_certificate(owner,
        data)`: gets the certificate the broker's owner publishes (None: not subscribed); `on_state()`: called
        when `connected` or `down` changes; `on_revocations(owner, data)`: gets the revocation list the
        broker's owner offers (at most MAX_REVOCATION_BYTES; not parsed here)."""
        if tls_context.verify_mode != ssl.CERT_REQUIRED:
            raise ValueError("a link's TLS context must verify the broker's certificate")
        self.host = host
        self.port = port
        self.federation_id = check_level(federation_id, "federation id")
        self.node_id = check_level(node_id, "node id")
        self.expected = expected
        self._on_state = on_state
        self._down = False
        self._tls = tls_context
        self._identify = identify
        self._on_certificate = on_certificate
        self._on_update = on_update
        self._on_reject = on_reject
        self._on_revocations = on_revocations
        self.peer_id: str | None = None  # the broker's node id, proven by TLS in the current session
        self.bytes_in = 0
        self._reassembler = Reassembler(max_message_bytes)
        self._client: aiomqtt.Client | None = None
        self._ready = False  # connected, broker identity checked and subscriptions granted
        self._session_began: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._state = "idle"

    @property
    def connected(self) -> bool:
        """True once connected and subscribed (retained certificate/update are on their way)."""
        return self._ready

    @property
    def down(self) -> bool:
        """True from the end of a failed attempt or a dropped session until the next session is up;
        False while the first attempt is still under way."""
        return self._down

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        if self._task is not None and not self._task.done():
            return
        self._task = asyncio.create_task(self._run(), name=f"p2pfl-link-{self.name}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        self._on_state = None  # a stopped link reports nothing more
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
            log.info("link %s: connected to %s (mutual TLS)", self.name, self.peer_id)
        elif state == "refused":
            log.warning("link %s: connection refused: %s", self.name, detail)
            self._reject(Reason.AUTH_FAILED, f"{self.name} refused our CONNECT: {detail}")
        elif state == "tls-failed":
            log.warning("link %s: TLS handshake failed: %s", self.name, detail)
            self._reject(Reason.HANDSHAKE, f"{self.name}: {detail}")
        else:
            log.info("link %s: %s (%s); retrying with backoff", self.name, state, detail)

    async def _run(self) -> None:
        delay = BACKOFF_MIN_S
        loop = asyncio.get_running_loop()
        while True:
            self._session_began = None
            await self._one_session()
            began = self._session_began
            if began is not None and loop.time() - began >= HEALTHY_SESSION_S:
                delay = BACKOFF_MIN_S
            await asyncio.sleep(delay * random.uniform(0.75, 1.25))
            delay = min(delay * 2, BACKOFF_MAX_S)

    async def _one_session(self) -> None:
        """Run one session to its end and record why it ended; never raises (but is cancellable)."""
        try:
            await self._session()
            self._set_state("disconnected", "broker closed the connection")
        except Rejected as exc:  # the broker is not who it must be: the session was closed
            if self._state != f"impostor-{exc.reason.value}":
                log.warning("link %s: %s", self.name, exc.detail)
                self._reject(exc.reason, f"{self.name}: {exc.detail}")
            self._state = f"impostor-{exc.reason.value}"
        except MqttConnectError as exc:
            self._set_state("refused" if _connect_refusal_is_auth(exc) else "unreachable", str(exc))
        except aiomqtt.MqttError as exc:
            if _is_tls_failure(exc):
                self._set_state("tls-failed", str(exc))
            else:
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
            self.peer_id = None
            self._mark(down=True)

    def _mark(self, *, down: bool) -> None:
        if down == self._down:
            return
        self._down = down
        if self._on_state is not None:
            try:
                self._on_state()
            except Exception:  # noqa: BLE001 - a faulty callback must not end the link
                log.warning("on_state callback raised", exc_info=True)

    async def _session(self) -> None:
        """One connection: TLS, check who the broker is, subscribe (its certificate and our inbox),
        dispatch until it drops."""
        client = aiomqtt.Client(
            self.host,
            self.port,
            identifier=client_id_for(self.node_id),
            clean_session=True,
            tls_context=self._tls,
            timeout=CONNACK_TIMEOUT_S,
            keepalive=KEEPALIVE_S,
            max_queued_incoming_messages=MAX_QUEUED_INCOMING,
        )
        try:
            async with client:
                client.timeout = CLIENT_TIMEOUT_S
                self._session_began = asyncio.get_running_loop().time()
                owner = self._check_broker(client)
                self.peer_id = owner
                self._client = client
                self._reassembler.drop_incomplete()
                # one SUBSCRIBE: the broker replays the retained certificate before the retained parts
                filters = [inbox_filter(self.federation_id, self.node_id)]
                if self._on_certificate is not None:
                    filters.insert(0, cert_topic(self.federation_id, owner))
                if self._on_revocations is not None:
                    filters.append(revocations_topic(self.federation_id, owner))
                await self._subscribe(client, filters)
                self._ready = True
                self._set_state("connected", "")
                self._mark(down=False)
                async for message in client.messages:
                    await self._dispatch(message.topic.value, message.payload)
        finally:
            _close_orphan(client)
            _consume_disconnect(client)

    def _check_broker(self, client: aiomqtt.Client) -> str:
        """The broker's node id from its TLS certificate; Rejected unless it is the advertised one."""
        owner = self._identify(_tls_socket(client))
        if self.expected is not None and owner != self.expected:
            raise Rejected(
                Reason.PEER_IDENTITY,
                f"broker's TLS certificate is node {owner}, discovery advertised {self.expected}",
            )
        return owner

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

    # -- incoming messages ---------------------------------------------------------------------------

    async def _dispatch(self, topic: str, payload: Any) -> None:
        """Route one incoming message by its topic; a bad message is reported, never fatal to the link."""
        if not isinstance(payload, (bytes, bytearray)):
            return  # aiomqtt decodes nothing for us; anything else is not ours
        self.bytes_in += len(payload)
        parsed = parse_topic(topic)
        if parsed is None or parsed.federation_id != self.federation_id:
            return
        publisher = parsed.publisher
        if not publisher or len(publisher) > MAX_PUBLISHER_ID_CHARS:
            self._reject(Reason.MALFORMED, f"{self.name}: bad publisher id in topic")
            return
        try:
            if parsed.kind is Kind.CERT:
                self._take_certificate(publisher, payload)
            elif parsed.kind is Kind.INBOX:
                await self._take_part(parsed, payload)
            elif parsed.kind is Kind.REVOCATIONS:
                self._take_revocations(publisher, payload)
        except Rejected as exc:
            self._reject(exc.reason, f"{self.name} ({publisher}): {exc.detail}")
        except Exception:  # noqa: BLE001 - a faulty handler must not drop the link
            log.warning("link %s: handler failed for %s", self.name, topic, exc_info=True)

    def _take_certificate(self, publisher: str, payload: bytes | bytearray) -> None:
        size = len(payload)
        if size == 0 or publisher != self.peer_id or self._on_certificate is None:
            return  # retained certificate cleared, or not the proven owner's (never granted)
        if size > MAX_CERT_BYTES:
            raise Rejected(Reason.OVERSIZE, f"certificate of {size} bytes from {publisher}")
        self._on_certificate(publisher, bytes(payload))

    def _take_revocations(self, publisher: str, payload: bytes | bytearray) -> None:
        size = len(payload)
        if size == 0 or publisher != self.peer_id or self._on_revocations is None:
            return  # cleared, or not the proven owner's (never granted)
        if size > MAX_REVOCATION_BYTES:
            raise Rejected(Reason.OVERSIZE, f"revocation list of {size} bytes from {publisher}")
        self._on_revocations(publisher, bytes(payload))

    async def _take_part(self, topic: Topic, payload: bytes | bytearray) -> None:
        if topic.target != self.node_id or not payload:
            return  # not addressed to us (never granted by the broker), or a cleared part
        if topic.publisher != self.peer_id:
            raise Rejected(
                Reason.UNKNOWN_SENDER, "update part from another publisher than the broker's owner"
            )
        index = part_index(topic.index)
        if index is None:
            raise Rejected(Reason.MALFORMED, f"bad part index {topic.index[:16]!r}")
        message = self._reassembler.add(topic.publisher, payload, index)
        if message is not None:
            # an envelope.Owned bytearray (the receiver may decrypt it in place); on_update is
            # annotated bytes (mesh.OnUpdate) and only reads it as a buffer
            await self._on_update(topic.publisher, cast(bytes, message))
