"""PeerLink: this node's client connection to one neighbour's broker.

It subscribes to certificates, to the proofs answering its own sessions and (once the broker's
owner is proven, when proofs are in use) to its own inbox there; it rebuilds updates from their
parts and hands them on. It reconnects with backoff until stopped.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import aiomqtt
from aiomqtt.exceptions import MqttConnectError

from p2pfl.errors import Reason, Rejected
from p2pfl.federation import MAX_CERT_BYTES
from p2pfl.transport.framing import Reassembler
from p2pfl.transport.topics import (
    QOS,
    Kind,
    Topic,
    cert_filter,
    check_level,
    inbox_filter,
    parse_topic,
    part_index,
    proof_filter,
)

log = logging.getLogger(__name__)

MAX_PUBLISHER_ID_CHARS = 64
MAX_PROOF_BYTES = MAX_CERT_BYTES  # a proof is a signature over a short message: far smaller
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

    def __init__(
        self,
        host: str,
        port: int,
        federation_id: str,
        credentials: Callable[[], tuple[str, str]],
        *,
        on_certificate: Callable[[str, bytes], None],
        on_update: Callable[[str, bytes], Awaitable[None]],
        on_reject: Callable[[Reason, str], None],
        max_message_bytes: int,
        on_proof: Callable[[str, bytes, str], None] | None = None,
    ) -> None:
        """With `on_proof`, update parts are accepted only from `trusted_publisher`, which the owner of
        this link sets after checking the broker's proof (publisher, proof, this session's password)."""
        self.host = host
        self.port = port
        self.federation_id = check_level(federation_id, "federation id")
        self._credentials = credentials
        self._on_certificate = on_certificate
        self._on_update = on_update
        self._on_reject = on_reject
        self._on_proof = on_proof
        self.trusted_publisher: str | None = None
        self._inbox_followed = False
        self._password = ""
        self.bytes_in = 0
        self._reassembler = Reassembler(max_message_bytes)
        self._me: str | None = None  # our node id (username) on the current session
        self._client: aiomqtt.Client | None = None
        self._ready = False  # connected and initial subscriptions granted
        self._session_began: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._state = "idle"

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
        except MqttConnectError as exc:
            self._set_state("refused" if _connect_refusal_is_auth(exc) else "unreachable", str(exc))
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

    async def _session(self) -> None:
        """One connection: connect, subscribe (certificates and our own inbox), dispatch until it drops."""
        username, password = self._credentials()
        me = check_level(username, "node id (username)")
        self.trusted_publisher, self._password = None, password  # every session must be proven anew
        client = aiomqtt.Client(
            self.host,
            self.port,
            username=username,
            password=password,
            identifier=f"p2pfl-{secrets.token_hex(8)}",
            clean_session=True,
            timeout=CONNACK_TIMEOUT_S,
            keepalive=KEEPALIVE_S,
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
                await self._subscribe(
                    client, [cert_filter(self.federation_id), proof_filter(self.federation_id, me)]
                )
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
        if not self._inbox_followed and self._me is not None:
            self._inbox_followed = True
            await self._subscribe(client, [inbox_filter(self.federation_id, self._me)])

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
                await self._take_certificate(publisher, payload)
            elif parsed.kind is Kind.PROOF:
                await self._take_proof(parsed, payload)
            elif parsed.kind is Kind.INBOX:
                await self._take_part(parsed, payload)
        except Rejected as exc:
            self._reject(exc.reason, f"{self.name} ({publisher}): {exc.detail}")
        except Exception:  # noqa: BLE001 - a faulty handler must not drop the link
            log.warning("link %s: handler failed for %s", self.name, topic, exc_info=True)

    async def _take_certificate(self, publisher: str, payload: bytes | bytearray) -> None:
        size = len(payload)
        if size == 0:
            return  # retained certificate cleared
        if size > MAX_CERT_BYTES:
            raise Rejected(Reason.OVERSIZE, f"certificate of {size} bytes from {publisher}")
        self._on_certificate(publisher, bytes(payload))
        await self._follow_inbox_if_trusted()

    async def _take_proof(self, topic: Topic, payload: bytes | bytearray) -> None:
        if topic.target != self._me or self._on_proof is None or not 0 < len(payload) <= MAX_PROOF_BYTES:
            return  # not answering our session, not asked for, cleared or absurd
        self._on_proof(topic.publisher, bytes(payload), self._password)
        await self._follow_inbox_if_trusted()

    async def _take_part(self, topic: Topic, payload: bytes | bytearray) -> None:
        if topic.target != self._me or not payload:
            return  # not addressed to us (never granted by the broker), or a cleared part
        if self._on_proof is not None and topic.publisher != self.trusted_publisher:
            raise Rejected(Reason.UNKNOWN_SENDER, "update part before the broker proved who it is")
        index = part_index(topic.index)
        if index is None:
            raise Rejected(Reason.MALFORMED, f"bad part index {topic.index[:16]!r}")
        message = self._reassembler.add(topic.publisher, payload, index)
        if message is not None:
            await self._on_update(topic.publisher, message)
