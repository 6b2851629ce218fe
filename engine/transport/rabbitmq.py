"""The RabbitMQ transport (aio-pika): durable queues behind one direct exchange.

Each destination is a durable queue bound to the exchange by its own name. Publishes
are persistent, mandatory and wait for the publisher confirm. The queues of the
transport's own deployment (``declares``: every name under its prefix) are declared
before publishing, so commands wait for a worker that starts later; any other
destination is never declared by a publisher: a message no queue receives raises
:class:`~engine.errors.MessagesUnroutable` naming it (a process with another
``SAGA_TOPIC_PREFIX`` wrote it) instead of vanishing or piling up where nobody reads.
Consumers ack only when told to; the robust connection re-declares the topology and
restarts the consumers after a broker restart without help. Competing consumers share
a destination's queue, whatever their group, as on the in-process broker.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import ssl
import time
import uuid
from collections import OrderedDict, defaultdict
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aio_pika.exceptions import (
    AMQPError,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
)
from aio_pika.exceptions import PublishError as Unroutable
from aiormq.exceptions import (
    AuthenticationError,
    ConnectionNotAllowed,
    ProbableAuthenticationError,
)
from yarl import URL

from engine.errors import (
    ConfigError,
    MessagesRefused,
    MessagesUnroutable,
    PublishError,
    TransportError,
)
from engine.redact import redact
from engine.tls import tls_refusal
from engine.transport.base import (
    Mark,
    Message,
    dead_letter_copy,
)

log = logging.getLogger("saga.transport.rabbitmq")

#: AMQP has no message key, so the ordering key travels as a header.
KEY_HEADER = "x-saga-key"
#: Headers of a subscription's marker message (see RabbitSubscription.mark): its id,
#: when it was sent (seconds since the epoch), how many consumers it must pass, and
#: which it passed.
MARKER_HEADER = "x-saga-mark"
MARKER_SENT_HEADER = "x-saga-mark-sent"
MARKER_NEEDS_HEADER = "x-saga-mark-needs"
MARKER_PASSED_HEADER = "x-saga-mark-passed"
#: Completed markers a subscription remembers.
_MARKERS_KEPT = 256
#: A marker older than this is dropped: its mark was given up or its replica is gone.
_MARKER_AGE = 20.0
#: Pause before passing on the markers held (a marker takes one per consumer it passes).
_MARKER_PAUSE = 0.05

_FAILURES = (AMQPError, ChannelInvalidStateError, ConnectionError, OSError)

#: How RabbitMQ words a refusal over its max_message_size (the size of the body).
_MAX_SIZE = re.compile(r"larger than configured max size (\d+)")

#: The query parameters a broker URL may carry, by aiormq's names (it reads them):
#: the TLS ones (``amqps://`` only), the login mechanism, and connection tuning.
TLS_PARAMETERS = ("cafile", "certfile", "keyfile", "no_verify_ssl")
AMQP_PARAMETERS = (*TLS_PARAMETERS, "auth", "heartbeat", "name", "reconnect_interval")
#: Other clients' names for them (RabbitMQ's URI spec, pika), named in the error.
_OTHER_NAMES = {
    "cacertfile": "cafile",
    "ca_certs": "cafile",
    "verify": "no_verify_ssl",
    "auth_mechanism": "auth",
    "ssl": "amqps://",
}


def tls_context(url: str) -> ssl.SSLContext | None:
    """The TLS context of an ``amqps://`` URL (None for ``amqp://``), its parameters
    checked; anything unusable is a ConfigError of one line.

    The broker's certificate is verified by default: against ``cafile``, else the
    system's CAs, and its name must match the URL's host. ``certfile`` and ``keyfile``
    are the client's certificate and key (``auth=external`` logs in with them);
    ``no_verify_ssl=1`` turns verification off, and says so in a warning when the
    transport connects. The robust connection reconnects with this same context.
    """
    parsed = URL(url)
    query = parsed.query
    where = f"in broker URL {redact(url)!r}"
    for key in query:
        if key not in AMQP_PARAMETERS:
            hint = f" (here: {_OTHER_NAMES[key]})" if key in _OTHER_NAMES else ""
            raise ConfigError(
                f"unsupported parameter {key!r}{hint} {where}; "
                f"accepted: {', '.join(AMQP_PARAMETERS)}"
            )
        if len(query.getall(key)) > 1:
            raise ConfigError(f"parameter {key!r} given more than once {where}")
    auth = query.get("auth", "plain").lower()
    if auth not in ("plain", "external"):
        raise ConfigError(f"auth={query['auth']!r} {where}: use plain or external")
    tls = [key for key in TLS_PARAMETERS if key in query]
    if parsed.scheme != "amqps":
        if tls or auth == "external":
            raise ConfigError(f"{', '.join(tls) or 'auth=external'} {where} needs amqps://")
        return None
    no_verify = query.get("no_verify_ssl", "0")
    if no_verify not in ("0", "1"):
        raise ConfigError(f"no_verify_ssl={no_verify!r} {where}: use 0 or 1")
    for key in ("cafile", "certfile", "keyfile"):
        path = query.get(key)
        if path is not None and not (os.path.isfile(path) and os.access(path, os.R_OK)):
            raise ConfigError(f"{key} file {path!r} {where} does not exist or cannot be read")
    if "keyfile" in query and "certfile" not in query:
        raise ConfigError(f"keyfile {where} needs certfile (the client certificate)")
    if auth == "external":
        if "certfile" not in query:
            raise ConfigError(
                f"auth=external {where} logs in with a client certificate: add certfile "
                "(and keyfile)"
            )
        if parsed.password:
            raise ConfigError(
                f"auth=external {where} logs in with the client certificate, never a "
                "password: remove it from the URL"
            )
    try:
        context = ssl.create_default_context(cafile=query.get("cafile"))
        if "certfile" in query:
            context.load_cert_chain(query["certfile"], query.get("keyfile"))
    except ssl.SSLError as exc:
        raise ConfigError(f"unusable certificate or key {where}: {exc.reason or exc}") from None
    if no_verify == "1":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def refusal(exc: BaseException) -> str | None:
    """Why the broker refused this process's connection, if that is what ``exc`` is:
    its login, its vhost, its certificate or TLS. Configuration errors that no retry
    mends; an unreachable broker is not one of them."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        if isinstance(current, ProbableAuthenticationError | ConnectionNotAllowed):
            return f"login refused: {_amqp_reason(current)}"
        if isinstance(current, AuthenticationError):
            return f"login mechanism not offered: {_amqp_reason(current)}"
        refused = tls_refusal(current)
        if refused is not None:
            return refused
        current = current.__cause__ or current.__context__
    return None


def _amqp_reason(exc: BaseException) -> str:
    return " ".join(str(arg) for arg in exc.args) or type(exc).__name__


def _header_text(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


class RabbitDelivery:
    def __init__(
        self, subscription: RabbitSubscription, incoming: AbstractIncomingMessage, seq: int
    ) -> None:
        self._subscription = subscription
        self._incoming = incoming
        self.seq = seq
        headers = {k: _header_text(v) for k, v in (incoming.headers or {}).items()}
        key = headers.pop(KEY_HEADER, "")
        self._message = Message(subscription.destination, key, incoming.body, headers)
        self._settled = False

    @property
    def message(self) -> Message:
        return self._message

    @property
    def redelivered(self) -> bool:
        return bool(self._incoming.redelivered)

    def _settle(self) -> bool:
        if self._settled:
            return False
        self._settled = True
        return True

    async def _quietly(self, what: str, action: Any) -> None:
        """Settle on the broker; if the channel is gone the broker redelivers anyway."""
        try:
            await action
        except _FAILURES as exc:
            log.warning(
                "%s on %s failed, the broker will redeliver: %s",
                what,
                self._subscription.destination,
                exc or type(exc).__name__,
            )

    async def ack(self) -> None:
        if self._settle():
            self._subscription._unsettled.discard(self.seq)
            await self._quietly("ack", self._incoming.ack())

    async def nack(self) -> None:
        if self._settle():
            self._subscription._unsettled.discard(self.seq)
            self._subscription._nacked(self.seq)
            await self._quietly("nack", self._incoming.nack(requeue=True))

    async def dead_letter(self, reason: str) -> None:
        """Publish to the dead-letter queue, then ack; raises PublishError (and nacks)
        when the dead-letter queue did not confirm, so nothing is lost."""
        if self._settled:
            return
        transport = self._subscription.transport
        try:
            await transport.publish(
                [dead_letter_copy(self._message, transport.dead_letter_queue, reason)]
            )
        except (PublishError, TransportError):
            await self.nack()
            raise
        await self.ack()


class RabbitSubscription:
    """A consumer on one queue, on a channel of its own (closing it requeues the rest)."""

    def __init__(self, transport: RabbitTransport, destination: str) -> None:
        self.transport = transport
        self.destination = destination
        self._buffer: asyncio.Queue[AbstractIncomingMessage | None] = asyncio.Queue()
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._closed = False
        # Marks (see mark()): deliveries are numbered in arrival order per channel.
        self._seq = itertools.count()
        self._unsettled: set[int] = set()
        self._nacks = 0
        self._underlay: object = None
        self._epoch = 0
        self._id = uuid.uuid4().hex
        self._markers = itertools.count()
        #: Ids of this subscription's completed markers.
        self._markers_done: OrderedDict[str, bool] = OrderedDict()
        #: Markers held here until what arrived before them is settled, with their
        #: arrival number and headers (see _pass_markers).
        self._held: list[tuple[AbstractIncomingMessage, int, dict[str, str]]] = []
        self._forwarder: asyncio.Task[None] | None = None
        self._dropping: set[asyncio.Future[None]] = set()

    async def start(self, connection: AbstractRobustConnection) -> None:
        transport = self.transport
        try:
            async with asyncio.timeout(transport.connect_timeout):
                channel = await connection.channel()
                self._channel = channel
                await channel.set_qos(prefetch_count=transport.prefetch)
                exchange = await transport.declare_exchange(channel)
                self._queue = await transport.declare_queue(channel, exchange, self.destination)
                self._tag = await self._queue.consume(self._on_message)
        except (*_FAILURES, TimeoutError) as exc:
            await self.close()
            raise TransportError(
                f"cannot consume {self.destination} on {transport.where}: "
                f"{exc or type(exc).__name__}"
            ) from exc

    async def _on_message(self, incoming: AbstractIncomingMessage) -> None:
        # No await before the put: callbacks start in delivery order, so this keeps it.
        self._buffer.put_nowait(incoming)

    async def __aiter__(self) -> AsyncIterator[RabbitDelivery]:
        while not self._closed:
            incoming = await self._buffer.get()
            if incoming is None or self._closed:
                continue
            try:
                underlay = incoming.channel  # raises once its channel is gone
            except ChannelInvalidStateError:
                # Delivered before a reconnect: the broker requeued it already and
                # will deliver it again on the restored channel.
                continue
            self._on_channel(underlay)
            if MARKER_HEADER in (incoming.headers or {}):
                await self._marker_arrived(incoming)
                continue
            seq = next(self._seq)
            self._unsettled.add(seq)
            yield RabbitDelivery(self, incoming, seq)

    # -- marks ----------------------------------------------------------------------
    #
    # A queue has no offsets, so a mark is a marker message of this subscription's own,
    # published (confirmed) to its queue: FIFO puts it behind every message the queue
    # held, so what came before it went out to consumers before it. A passive declare's
    # message count would be no proof: deliveries already on their way to a consumer
    # are counted neither by the queue nor by the consumer yet.
    #
    # Whoever receives a marker holds it until everything that reached it before the
    # marker is settled. Competing consumers (engine replicas) share the queue, so the
    # marker must have passed through as many of them as the queue had when the mark
    # was taken: a consumer that is not yet among those it passed publishes a copy
    # naming itself too (behind more messages than the original: that only covers
    # more), and the mark is complete once its own subscription holds a copy that
    # has passed enough consumers.

    def _on_channel(self, underlay: object) -> None:
        """A new channel (the robust connection reopened it): the broker took back
        every unacked delivery, so older marks prove nothing."""
        if underlay is not self._underlay:
            self._underlay = underlay
            self._epoch += 1
            self._unsettled.clear()
            self._held.clear()

    async def _marker_arrived(self, incoming: AbstractIncomingMessage) -> None:
        headers = {k: _header_text(v) for k, v in (incoming.headers or {}).items()}
        try:
            age = time.time() - float(headers.get(MARKER_SENT_HEADER, ""))
        except ValueError:
            age = _MARKER_AGE
        if age >= _MARKER_AGE:  # its mark was given up, or its replica is gone
            await self._drop(incoming)
            return
        self._held.append((incoming, next(self._seq), headers))
        if self._forwarder is None or self._forwarder.done():
            self._forwarder = asyncio.create_task(self._pass_markers())

    async def _drop(self, incoming: AbstractIncomingMessage) -> None:
        try:
            await incoming.ack()
        except _FAILURES as exc:
            log.debug("ack of a marker on %s: %s", self.destination, exc)

    async def _pass_markers(self) -> None:
        """Pass on (or complete) the markers held here once everything that arrived
        before them is settled; paced, so replicas never bounce a marker hot."""
        while self._held and not self._closed:
            await asyncio.sleep(_MARKER_PAUSE)
            floor = min(self._unsettled, default=None)
            waiting = []
            for incoming, seq, headers in self._held:
                if floor is not None and floor < seq:
                    waiting.append((incoming, seq, headers))
                    continue
                await self._pass_marker(incoming, headers)
            self._held = waiting

    async def _pass_marker(
        self, incoming: AbstractIncomingMessage, headers: dict[str, str]
    ) -> None:
        marker = headers[MARKER_HEADER]
        passed = {p for p in headers.get(MARKER_PASSED_HEADER, "").split(",") if p}
        passed.add(self._id)
        if marker.startswith(f"{self._id}:") and len(passed) >= int(
            headers.get(MARKER_NEEDS_HEADER, "1")
        ):
            self._markers_done[marker] = True
            while len(self._markers_done) > _MARKERS_KEPT:
                self._markers_done.popitem(last=False)
        else:
            copy = {**headers, MARKER_PASSED_HEADER: ",".join(sorted(passed))}
            try:
                await self.transport.publish_marker(self.destination, copy)
            except (*_FAILURES, Unroutable, TimeoutError, TransportError) as exc:
                log.debug("passing on a marker on %s: %s", self.destination, exc)
        await self._drop(incoming)

    def _nacked(self, seq: int) -> None:
        """A delivery went back to the queue, maybe behind markers that came after it:
        those prove nothing now (their marks then wait for newer ones)."""
        self._nacks += 1
        dead = [held for held in self._held if held[1] > seq]
        self._held = [held for held in self._held if held[1] <= seq]
        for incoming, _, _ in dead:
            task = asyncio.ensure_future(self._drop(incoming))
            self._dropping.add(task)
            task.add_done_callback(self._dropping.discard)

    async def mark(self) -> Mark:
        channel = self._channel
        if channel is None or self._closed:
            raise TransportError(f"not consuming {self.destination}")
        try:
            async with asyncio.timeout(self.transport.publish_timeout):
                underlay = await channel.get_underlay_channel()
                self._on_channel(underlay)
                epoch, nacks = self._epoch, self._nacks
                declared = await underlay.queue_declare(self.destination, passive=True)
                marker = f"{self._id}:{next(self._markers)}"
                headers = {
                    MARKER_HEADER: marker,
                    MARKER_SENT_HEADER: f"{time.time():.3f}",
                    MARKER_NEEDS_HEADER: str(max(1, declared.consumer_count or 0)),
                }
                await self.transport.publish_marker(self.destination, headers)
        except (*_FAILURES, Unroutable, TimeoutError) as exc:
            raise TransportError(
                f"cannot mark {self.destination}: {exc or type(exc).__name__}"
            ) from exc
        return Mark(epoch, (marker, nacks))

    async def settled_past(self, mark: Mark) -> bool:
        """The marker came back here through enough consumers, on the same channel,
        with nothing handed back here since it was sent (a requeued message could
        come after it)."""
        marker, nacks = mark.position
        done = self._markers_done.get(marker, False)
        return done and mark.epoch == self._epoch and nacks == self._nacks

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._buffer.put_nowait(None)
        if self._forwarder is not None:
            self._forwarder.cancel()  # the channel's close hands the held markers back
        channel, self._channel = self._channel, None
        if channel is None or channel.is_closed:
            return
        try:
            async with asyncio.timeout(self.transport.connect_timeout):
                if self._queue is not None and self._tag is not None:
                    await self._queue.cancel(self._tag)
                # Closing the channel hands every unacked message back to the broker.
                await channel.close()
        except (*_FAILURES, TimeoutError) as exc:
            log.warning("closing the consumer of %s: %s", self.destination, exc)


class RabbitTransport:
    """The :class:`~engine.transport.base.Transport` over RabbitMQ."""

    def __init__(
        self,
        url: str,
        *,
        exchange: str = "saga",
        dead_letter_queue: str = "saga.dead-letters",
        # Unacknowledged deliveries per consumer: the engine and the workers apply what
        # arrived together as one batch, and 32 kept the batches small (RabbitMQ+PG
        # went from ~122 to ~150 sagas/s at 128 in the benchmark; 256 did no better).
        prefetch: int = 128,
        publish_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        reconnect_interval: float = 1.0,
        declares: str | None = None,
    ) -> None:
        self.url = url
        #: The prefix of the queues publishing declares (``p`` covers ``p`` and every
        #: ``p.*``); None: every destination published to (as a test's transport).
        self.declares = declares
        #: The TLS context of an amqps:// URL (checked here: a bad one never connects).
        self.ssl_context = tls_context(url)
        self.exchange_name = exchange
        self.dead_letter_queue = dead_letter_queue
        self.prefetch = prefetch
        self.publish_timeout = publish_timeout
        self.connect_timeout = connect_timeout
        self.reconnect_interval = reconnect_interval
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._declared: set[str] = set()
        self._declare_lock = asyncio.Lock()
        self._subscriptions: list[RabbitSubscription] = []

    @property
    def where(self) -> str:
        """Host, port and vhost, never the password: this lands in logs and errors."""
        url = URL(self.url)
        port = url.port or (5671 if url.scheme == "amqps" else 5672)
        vhost = url.path[1:] if len(url.path) > 1 else ""
        return f"RabbitMQ at {url.host}:{port}" + (f" (vhost {vhost})" if vhost else "")

    def queue_arguments(self, name: str) -> dict[str, Any]:
        """Broker-side rejections (e.g. expired or over-long) land in the dead letters."""
        if name == self.dead_letter_queue:
            return {}
        return {
            "x-dead-letter-exchange": self.exchange_name,
            "x-dead-letter-routing-key": self.dead_letter_queue,
        }

    async def declare_exchange(self, channel: AbstractChannel) -> AbstractExchange:
        return await channel.declare_exchange(
            self.exchange_name, aio_pika.ExchangeType.DIRECT, durable=True
        )

    async def declare_queue(
        self, channel: AbstractChannel, exchange: AbstractExchange, name: str
    ) -> AbstractQueue:
        try:
            queue = await channel.declare_queue(
                name, durable=True, arguments=self.queue_arguments(name)
            )
        except ChannelPreconditionFailed as exc:
            raise TransportError(
                f"queue {name} exists on {self.where} with other settings: {exc}"
            ) from exc
        await queue.bind(exchange, routing_key=name)
        return queue

    async def connect(self) -> None:
        if self._connection is not None:
            return
        url = URL(self.url)
        if "reconnect_interval" not in url.query:
            url = url.update_query(reconnect_interval=self.reconnect_interval)
        if self.ssl_context is not None and self.ssl_context.verify_mode == ssl.CERT_NONE:
            log.warning(
                "no_verify_ssl=1: the TLS certificate of %s is not verified; whoever is "
                "on the network path can read and change what is sent",
                self.where,
            )
        # Built here rather than by connect_robust, so a failed first attempt can be
        # closed: otherwise its reconnect task would keep retrying in the background.
        # Every reconnect uses the same TLS context.
        connection = aio_pika.RobustConnection(
            url,
            ssl_context=self.ssl_context,
            client_properties={"connection_name": "saga-engine"},
        )
        try:
            async with asyncio.timeout(self.connect_timeout):
                await connection.connect(timeout=self.connect_timeout)
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                self._exchange = await self.declare_exchange(channel)
                await self.declare_queue(channel, self._exchange, self.dead_letter_queue)
        except (*_FAILURES, TimeoutError) as exc:
            await connection.close()
            refused = refusal(exc)
            if refused is not None:
                raise TransportError(f"{self.where}: {refused}") from exc
            raise TransportError(f"cannot reach {self.where}: {exc or type(exc).__name__}") from exc
        except BaseException:
            await connection.close()
            raise
        self._declared = {self.dead_letter_queue}
        self._connection, self._channel = connection, channel

    async def close(self) -> None:
        for subscription in self._subscriptions:
            await subscription.close()
        self._subscriptions.clear()
        connection, self._connection = self._connection, None
        self._channel = self._exchange = None
        if connection is not None:
            try:
                await connection.close()
            except _FAILURES as exc:
                log.warning("closing the connection to %s: %s", self.where, exc)

    def _own(self, name: str) -> bool:
        """Whether publishing may declare ``name``'s queue: one of this deployment's."""
        prefix = self.declares
        return prefix is None or name == prefix or name.startswith(f"{prefix}.")

    async def _ensure_queues(self, names: set[str]) -> None:
        """Declare this deployment's destinations before publishing (commands then
        wait for their worker); others must be bound by their consumer, or raise."""
        names = {n for n in names if self._own(n)}
        if names <= self._declared:
            return
        async with self._declare_lock:
            assert self._channel is not None and self._exchange is not None
            for name in sorted(names - self._declared):
                await self.declare_queue(self._channel, self._exchange, name)
                self._declared.add(name)

    async def publish(self, messages: Sequence[Message]) -> None:
        if not messages:
            return
        exchange, channel = self._exchange, self._channel
        if exchange is None or channel is None:
            raise TransportError("RabbitMQ transport is not connected")
        confirmed: set[int] = set()
        refused: dict[int, str] = {}
        unroutable: dict[int, str] = {}
        todo = list(range(len(messages)))
        failure: BaseException | None = None
        try:
            async with asyncio.timeout(self.publish_timeout):
                await self._ensure_queues({m.destination for m in messages})
                failure = await _publish_by_key(exchange, messages, todo, confirmed, unroutable)
                while isinstance(failure, ChannelPreconditionFailed):
                    # The broker closed the channel over a message it will never take,
                    # and every publish in flight went with it; the unconfirmed ones go
                    # again on the restored channel. Over its max_message_size (the
                    # limit is in its words) the culprits are known; otherwise they are
                    # found by sending one at a time, in order.
                    reason = " ".join(str(failure).split())
                    todo = [i for i in todo if i not in confirmed and i not in unroutable]
                    limit = _size_limit(reason)
                    over = [i for i in todo if limit is not None and len(messages[i].body) > limit]
                    refused |= dict.fromkeys(over, reason)
                    todo = [i for i in todo if i not in refused]
                    await _restored(channel)
                    if over:
                        failure = await _publish_by_key(
                            exchange, messages, todo, confirmed, unroutable
                        )
                    else:
                        await _publish_one_by_one(
                            channel, exchange, messages, todo, refused, unroutable
                        )
                        failure = None
        except TimeoutError:
            raise PublishError(
                f"{self.where} did not confirm {len(messages)} messages "
                f"within {self.publish_timeout:g}s"
            ) from None
        except Unroutable as exc:
            raise PublishError(f"{self.where} could not route a message: {exc}") from exc
        except _FAILURES as exc:
            raise PublishError(f"{self.where} refused a publish: {exc}") from exc
        if isinstance(failure, Unroutable):
            raise PublishError(f"{self.where} could not route a message: {failure}")
        if failure is not None:
            raise PublishError(f"{self.where} refused a publish: {failure}") from failure
        if unroutable:
            raise MessagesUnroutable(unroutable, len(messages), self.where, refused)
        if refused:
            raise MessagesRefused(refused, len(messages), self.where)

    async def publish_marker(self, destination: str, headers: Mapping[str, str]) -> None:
        """A transient empty marker message to ``destination`` (for marks), confirmed."""
        exchange = self._exchange
        if exchange is None:
            raise TransportError("RabbitMQ transport is not connected")
        async with asyncio.timeout(self.publish_timeout):
            await exchange.publish(
                aio_pika.Message(b"", headers=dict(headers)),
                routing_key=destination,
                mandatory=True,
            )

    async def has_readers(self, destination: str) -> bool:
        """Whether a consumer is attached to ``destination``'s queue now (False if no
        queue is bound for it). Asked on a short-lived channel of its own: the broker
        closes the channel of a passive declare of a missing queue."""
        connection = self._connection
        if connection is None:
            raise TransportError("RabbitMQ transport is not connected")
        try:
            async with asyncio.timeout(self.connect_timeout):
                async with aio_pika.Channel(connection, publisher_confirms=False) as channel:
                    queue = await channel.declare_queue(destination, passive=True)
        except ChannelNotFoundEntity:
            return False
        return bool(queue.declaration_result.consumer_count)

    def nobody_reads(self, destination: str) -> str:
        """What :meth:`has_readers` saying no means here, for the relay's warning."""
        return f"no consumer reads queue {destination}"

    async def subscribe(self, destination: str, *, group: str) -> RabbitSubscription:
        if self._connection is None:
            raise TransportError("RabbitMQ transport is not connected")
        subscription = RabbitSubscription(self, destination)
        await subscription.start(self._connection)
        self._subscriptions.append(subscription)
        return subscription


async def _routed(exchange: AbstractExchange, message: Message) -> bool:
    """Publish and wait for the confirm; False when no queue received it (mandatory:
    the broker returned it)."""
    try:
        await exchange.publish(_outgoing(message), routing_key=message.destination, mandatory=True)
    except Unroutable:
        return False
    return True


async def _publish_by_key(
    exchange: AbstractExchange,
    messages: Sequence[Message],
    indexes: Sequence[int],
    confirmed: set[int],
    unroutable: dict[int, str],
) -> BaseException | None:
    """Publish ``messages[i]`` for each index, adding each confirmed one to
    ``confirmed`` and each one no queue received to ``unroutable``; the failure that
    stopped a key's messages, a refusal that closed the channel first."""
    # One key's messages go one after the other (each confirmed before the next),
    # which keeps them in order; different keys go concurrently.
    by_key: dict[str, list[int]] = defaultdict(list)
    for i in indexes:
        by_key[messages[i].key].append(i)

    async def in_order(chain: list[int]) -> None:
        blocked: set[str] = set()  # the key's later messages there must not overtake
        for i in chain:
            destination = messages[i].destination
            if destination not in blocked and await _routed(exchange, messages[i]):
                confirmed.add(i)
            else:
                blocked.add(destination)
                unroutable[i] = destination

    results = await asyncio.gather(
        *(in_order(chain) for chain in by_key.values()), return_exceptions=True
    )
    failures = [r for r in results if isinstance(r, BaseException)]
    refusals = [f for f in failures if isinstance(f, ChannelPreconditionFailed)]
    return (refusals or failures or [None])[0]


async def _publish_one_by_one(
    channel: AbstractChannel,
    exchange: AbstractExchange,
    messages: Sequence[Message],
    indexes: Sequence[int],
    refused: dict[int, str],
    unroutable: dict[int, str],
) -> None:
    """Publish each alone; one the broker closes the channel over goes to ``refused``,
    one no queue receives to ``unroutable`` (with the rest of its destination)."""
    for i in indexes:
        destination = messages[i].destination
        await _restored(channel)
        try:
            if destination not in unroutable.values() and await _routed(exchange, messages[i]):
                continue
            unroutable[i] = destination
        except ChannelPreconditionFailed as exc:
            refused[i] = " ".join(str(exc).split())


def _size_limit(reason: str) -> int | None:
    """The broker's max_message_size, if that is what its refusal names."""
    found = _MAX_SIZE.search(reason)
    return int(found.group(1)) if found else None


async def _restored(channel: AbstractChannel) -> None:
    """Wait until a robust channel the broker closed is open again, its exchange and
    queues declared (the caller bounds the wait)."""
    if not channel.is_closed:
        return
    if not isinstance(channel, AbstractRobustChannel):
        raise TransportError("the publishing channel was closed")
    reopened = asyncio.Event()

    def on_reopen(_: AbstractRobustChannel | None, /) -> None:
        reopened.set()

    channel.reopen_callbacks.add(on_reopen)
    try:
        if channel.is_closed:
            await reopened.wait()
    finally:
        channel.reopen_callbacks.discard(on_reopen)


def _outgoing(message: Message) -> aio_pika.Message:
    headers: Mapping[str, str] = {**message.headers, KEY_HEADER: message.key}
    return aio_pika.Message(
        message.body,
        headers=dict(headers),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        content_type="application/octet-stream",
    )
