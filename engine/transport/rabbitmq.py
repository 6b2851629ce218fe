"""The RabbitMQ transport (aio-pika): durable queues behind one direct exchange.

Each destination is a durable queue bound to the exchange by its own name. Publishes
are persistent, mandatory (an unroutable message raises instead of vanishing) and
wait for the publisher confirm. Consumers ack only when told to; the robust
connection re-declares the topology and restarts the consumers after a broker
restart without help. Competing consumers share a destination's queue, whatever
their group, as on the in-process broker.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import defaultdict
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
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError, ChannelPreconditionFailed
from aio_pika.exceptions import PublishError as Unroutable
from yarl import URL

from engine.errors import MessagesRefused, PublishError, TransportError
from engine.transport.base import (
    Message,
    dead_letter_copy,
)

log = logging.getLogger("saga.transport.rabbitmq")

#: AMQP has no message key, so the ordering key travels as a header.
KEY_HEADER = "x-saga-key"

_FAILURES = (AMQPError, ChannelInvalidStateError, ConnectionError, OSError)

#: How RabbitMQ words a refusal over its max_message_size (the size of the body).
_MAX_SIZE = re.compile(r"larger than configured max size (\d+)")


def _header_text(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


class RabbitDelivery:
    def __init__(self, subscription: RabbitSubscription, incoming: AbstractIncomingMessage):
        self._subscription = subscription
        self._incoming = incoming
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
            await self._quietly("ack", self._incoming.ack())

    async def nack(self) -> None:
        if self._settle():
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
                incoming.channel  # noqa: B018  # raises once its channel is gone
            except ChannelInvalidStateError:
                # Delivered before a reconnect: the broker requeued it already and
                # will deliver it again on the restored channel.
                continue
            yield RabbitDelivery(self, incoming)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._buffer.put_nowait(None)
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
    ) -> None:
        self.url = url
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
        # Built here rather than by connect_robust, so a failed first attempt can be
        # closed: otherwise its reconnect task would keep retrying in the background.
        connection = aio_pika.RobustConnection(
            url, client_properties={"connection_name": "saga-engine"}
        )
        try:
            async with asyncio.timeout(self.connect_timeout):
                await connection.connect(timeout=self.connect_timeout)
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                self._exchange = await self.declare_exchange(channel)
                await self.declare_queue(channel, self._exchange, self.dead_letter_queue)
        except (*_FAILURES, TimeoutError) as exc:
            await connection.close()
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

    async def _ensure_queues(self, names: set[str]) -> None:
        """Declare destinations before publishing, so nothing is unroutable by accident."""
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
        todo = list(range(len(messages)))
        failure: BaseException | None = None
        try:
            async with asyncio.timeout(self.publish_timeout):
                await self._ensure_queues({m.destination for m in messages})
                failure = await _publish_by_key(exchange, messages, todo, confirmed)
                while isinstance(failure, ChannelPreconditionFailed):
                    # The broker closed the channel over a message it will never take,
                    # and every publish in flight went with it; the unconfirmed ones go
                    # again on the restored channel. Over its max_message_size (the
                    # limit is in its words) the culprits are known; otherwise they are
                    # found by sending one at a time, in order.
                    reason = " ".join(str(failure).split())
                    todo = [i for i in todo if i not in confirmed]
                    limit = _size_limit(reason)
                    over = [i for i in todo if limit is not None and len(messages[i].body) > limit]
                    refused |= dict.fromkeys(over, reason)
                    todo = [i for i in todo if i not in refused]
                    await _restored(channel)
                    if over:
                        failure = await _publish_by_key(exchange, messages, todo, confirmed)
                    else:
                        await _publish_one_by_one(channel, exchange, messages, todo, refused)
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
        if refused:
            raise MessagesRefused(refused, len(messages), self.where)

    async def subscribe(self, destination: str, *, group: str) -> RabbitSubscription:
        if self._connection is None:
            raise TransportError("RabbitMQ transport is not connected")
        subscription = RabbitSubscription(self, destination)
        await subscription.start(self._connection)
        self._subscriptions.append(subscription)
        return subscription


async def _publish_one(exchange: AbstractExchange, message: Message) -> None:
    """Publish and wait for the confirm; mandatory: an unroutable message raises."""
    await exchange.publish(_outgoing(message), routing_key=message.destination, mandatory=True)


async def _publish_by_key(
    exchange: AbstractExchange,
    messages: Sequence[Message],
    indexes: Sequence[int],
    confirmed: set[int],
) -> BaseException | None:
    """Publish ``messages[i]`` for each index, adding each confirmed one to
    ``confirmed``; the failure that stopped a key's messages, a refusal that closed
    the channel first."""
    # One key's messages go one after the other (each confirmed before the next),
    # which keeps them in order; different keys go concurrently.
    by_key: dict[str, list[int]] = defaultdict(list)
    for i in indexes:
        by_key[messages[i].key].append(i)

    async def in_order(chain: list[int]) -> None:
        for i in chain:
            await _publish_one(exchange, messages[i])
            confirmed.add(i)

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
) -> None:
    """Publish each alone; one the broker closes the channel over goes to ``refused``."""
    for i in indexes:
        await _restored(channel)
        try:
            await _publish_one(exchange, messages[i])
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
