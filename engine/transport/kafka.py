"""The Kafka transport (aiokafka): one topic per destination, keyed by saga id.

Kafka has no per-message acknowledgement, only a committed offset per partition, so
this module keeps the books that turn offsets into the protocol's ack / nack /
dead-letter: an offset is committed only once every earlier offset fetched from its
partition is settled, a nack seeks the partition back, and whatever is not committed
when a subscription closes (or loses its partitions) is delivered again.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.conn import create_conn
from aiokafka.errors import (
    AuthenticationFailedError,
    AuthenticationMethodNotSupported,
    ClusterAuthorizationFailedError,
    IllegalSaslStateError,
    InvalidProducerEpoch,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    RecordListTooLargeError,
    RecordTooLargeError,
    SaslAuthenticationFailed,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    UnknownProducerId,
    UnsupportedSaslMechanismError,
    for_code,
)

from engine.errors import ConfigError, MessagesRefused, PublishError, TransportError
from engine.transport.base import (
    Mark,
    Message,
    dead_letter_copy,
)
from engine.transport.kafka_options import KafkaOptions, setting

log = logging.getLogger("saga.transport.kafka")

#: Errors after which an idempotent producer never sends again: its sequence numbers
#: no longer match the broker's (e.g. a batch in flight when the broker restarted), its
#: sender task has died, and every later send fails the same way. It must be replaced.
_PRODUCER_BROKEN = (
    OutOfOrderSequenceNumber,
    UnknownProducerId,
    InvalidProducerEpoch,
    ProducerFenced,
)

#: Refusals no retry can overcome: the message (or its topic) is the problem, not the
#: broker's health. A message over ``max_request_size`` is refused by the client; one
#: over the topic's ``max.message.bytes`` by the broker. (The producer's batches of
#: small messages stay under its ``max_batch_size``, 16 KiB, so a refused batch holds
#: the one large message.) Anything else fails the whole publish, to be sent again.
_REFUSED_FOR_GOOD = (
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    InvalidTopicError,
    TopicAuthorizationFailedError,
)

#: A login the broker refused: wrong credentials or mechanism, or no such user.
_SASL_REFUSED = (
    SaslAuthenticationFailed,
    AuthenticationFailedError,
    AuthenticationMethodNotSupported,
    UnsupportedSaslMechanismError,
    IllegalSaslStateError,
)

#: TLS failures a retry may overcome: the connection was cut, not refused.
_TLS_CUT = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)

#: TLS alerts of a broker that refused the client's certificate, or its lack of one.
_CLIENT_CERTIFICATE_REFUSED = (
    "SSLV3_ALERT_BAD_CERTIFICATE",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    "TLSV1_ALERT_UNKNOWN_CA",
)

#: OpenSSL's verify codes of a certificate that does not name the host connected to.
_NAME_MISMATCH = (62, 64)  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH

#: Kafka's legal topic names; others are refused without asking the broker.
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")

#: Committed-offset metadata prefix recording how far a partition was handed out.
_DELIVERED = "delivered="


def _delivered_mark(metadata: str | None) -> int:
    if metadata and metadata.startswith(_DELIVERED):
        try:
            return int(metadata[len(_DELIVERED) :])
        except ValueError:
            return 0
    return 0


def _message(topic: str, record: Any) -> Message:
    key = record.key.decode("utf-8", "replace") if record.key is not None else ""
    headers = {
        name: (value or b"").decode("utf-8", "replace") for name, value in record.headers or ()
    }
    return Message(topic, key, record.value or b"", headers)


@dataclass(eq=False)
class _Partition:
    """Settlement books of one assigned partition, valid until it is revoked."""

    tp: Any
    #: Fetched (buffered or handed out) and not settled; bounds the commit.
    pending: set[int] = field(default_factory=set)
    #: Settled above the committed offset: skipped when a seek-back refetches them.
    settled: set[int] = field(default_factory=set)
    #: Handed out and not settled: skipped when a seek-back refetches them.
    in_flight: set[int] = field(default_factory=set)
    #: One past the highest offset fetched.
    fetched_to: int = 0
    #: One past the highest offset handed out, by this or (per the committed
    #: metadata) an earlier owner: lower offsets are redeliveries.
    delivered_to: int = 0
    marks_loaded: bool = False
    #: Bumped by every seek-back, so records fetched before it are dropped.
    epoch: int = 0
    committed: tuple[int, int] | None = None
    revoked: bool = False

    def commit_point(self) -> int:
        return min(self.pending) if self.pending else self.fetched_to

    def to_commit(self) -> tuple[int, int] | None:
        """(offset, delivered_to) to commit now, or None if unchanged since the last."""
        if self.fetched_to == 0:
            return None  # nothing fetched: the committed offset is still right
        mark = (self.commit_point(), self.delivered_to)
        return None if mark == self.committed else mark


class KafkaDelivery:
    def __init__(
        self,
        subscription: KafkaSubscription,
        partition: _Partition,
        offset: int,
        message: Message,
        redelivered: bool,
    ) -> None:
        self._subscription = subscription
        self._partition = partition
        self._offset = offset
        self._message = message
        self._redelivered = redelivered
        self._settled = False

    @property
    def message(self) -> Message:
        return self._message

    @property
    def redelivered(self) -> bool:
        """Kafka keeps no delivery count: true when this subscription, or an earlier
        owner of the partition (per its committed metadata), handed the offset out."""
        return self._redelivered

    @property
    def offset(self) -> int:
        return self._offset

    def _settle(self) -> bool:
        if self._settled:
            return False
        self._settled = True
        self._partition.in_flight.discard(self._offset)
        return True

    async def ack(self) -> None:
        if self._settle():
            await self._subscription._acked(self._partition, self._offset)

    async def nack(self) -> None:
        if self._settle():
            self._subscription._nacked(self._partition, self._offset)

    async def dead_letter(self, reason: str) -> None:
        """Publish to the dead-letter topic, then ack; raises PublishError (and nacks)
        when the dead-letter topic did not confirm, so nothing is lost."""
        if self._settled:
            return
        transport = self._subscription.transport
        try:
            await transport.publish(
                [dead_letter_copy(self._message, transport.dead_letter_topic, reason)]
            )
        except (PublishError, TransportError):
            await self.nack()
            raise
        await self.ack()


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    def __init__(self, subscription: KafkaSubscription) -> None:
        self._subscription = subscription

    async def on_partitions_revoked(self, revoked: Iterable[Any]) -> None:
        await self._subscription._revoke(revoked)

    async def on_partitions_assigned(self, assigned: Iterable[Any]) -> None:
        # aiokafka's own account of the group is INFO noise, hidden by default; which
        # partitions a member got is what tells a stalled consumer from an idle one.
        partitions = sorted(tp.partition for tp in assigned)
        subscription = self._subscription
        log.info(
            "%s, group %s: assigned partitions %s",
            subscription.topic,
            subscription.group,
            partitions,
        )


class KafkaSubscription:
    """One consumer-group member on one topic, with explicit per-partition commits."""

    def __init__(self, transport: KafkaTransport, topic: str, group: str) -> None:
        self.transport = transport
        self.topic = topic
        self.group = group
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=transport.bootstrap_servers,
            client_id=transport.client_id,
            **transport._security,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=transport.max_poll_records,
            fetch_max_wait_ms=100,
        )
        self._partitions: dict[Any, _Partition] = {}
        self._ready: deque[tuple[Any, _Partition, int]] = deque()
        self._commit_lock = asyncio.Lock()
        #: Partitions with acks not yet committed, and the task committing them.
        self._dirty: set[_Partition] = set()
        self._committer: asyncio.Task[None] | None = None
        self._fetch: asyncio.Future[Any] | None = None
        self._closed = False

    async def start(self) -> None:
        try:
            async with asyncio.timeout(self.transport.connect_timeout):
                await self._consumer.start()
        except (KafkaError, OSError, TimeoutError) as exc:
            await self._consumer.stop()
            raise TransportError(
                f"cannot consume {self.topic} from Kafka at "
                f"{','.join(self.transport.bootstrap_servers)}: {exc or type(exc).__name__}"
            ) from exc
        # Subscribing after start: joining the group (which can wait for a slow
        # rebalance) happens in the background instead of inside the connect bound.
        self._consumer.subscribe([self.topic], listener=_Rebalance(self))

    # -- iteration ------------------------------------------------------------------

    async def __aiter__(self) -> AsyncIterator[KafkaDelivery]:
        while not self._closed:
            if not self._ready:
                await self._fill()
                continue
            record, partition, epoch = self._ready.popleft()
            offset: int = record.offset
            if partition.revoked or epoch != partition.epoch:
                continue  # the partition moved on (revoked, or a nack sought back)
            if offset in partition.in_flight or offset in partition.settled:
                continue  # refetched after a seek-back, but already handled
            if not partition.marks_loaded:
                await self._load_marks(partition)
                if partition.revoked or epoch != partition.epoch:
                    continue
            redelivered = offset < partition.delivered_to
            partition.delivered_to = max(partition.delivered_to, offset + 1)
            partition.in_flight.add(offset)
            yield KafkaDelivery(self, partition, offset, _message(self.topic, record), redelivered)

    async def _fill(self) -> None:
        fetch = asyncio.ensure_future(self._consumer.getmany(timeout_ms=1000))
        self._fetch = fetch
        try:
            await asyncio.wait([fetch])
        finally:
            self._fetch = None
            if not fetch.done():
                fetch.cancel()
        if fetch.cancelled() or self._closed:
            return
        try:
            batches = fetch.result()
        except KafkaError as exc:
            if not getattr(exc, "retriable", False):
                raise TransportError(f"consuming {self.topic} failed: {exc}") from exc
            log.warning("consuming %s: %s; retrying", self.topic, exc)
            await asyncio.sleep(0.5)
            return
        for tp, records in batches.items():
            partition = self._partitions.get(tp)
            if partition is None:
                partition = self._partitions[tp] = _Partition(tp)
            for record in records:
                offset = record.offset
                if offset in partition.settled or offset in partition.in_flight:
                    continue
                partition.pending.add(offset)
                partition.fetched_to = max(partition.fetched_to, offset + 1)
                self._ready.append((record, partition, partition.epoch))

    async def _load_marks(self, partition: _Partition) -> None:
        """Learn how far earlier owners handed this partition out (see _DELIVERED)."""
        partition.marks_loaded = True
        try:
            async with asyncio.timeout(min(2.0, self.transport.request_timeout_ms / 1000)):
                offsets = await self.transport.admin().list_consumer_group_offsets(
                    self.group, partitions=[partition.tp]
                )
        except (KafkaError, OSError, TimeoutError, TransportError) as exc:
            log.debug("no delivery marks for %s: %s", partition.tp, exc)
            return
        committed = offsets.get(partition.tp)
        if committed is not None:
            mark = _delivered_mark(committed.metadata)
            partition.delivered_to = max(partition.delivered_to, mark)

    # -- settlement -----------------------------------------------------------------

    async def _acked(self, partition: _Partition, offset: int) -> None:
        partition.pending.discard(offset)
        partition.settled.add(offset)
        # Committed in the background, one request at a time: acks that come while a
        # commit is in flight share the next one. A commit per ack cost the broker a
        # write and the consumer a round trip per message; a crash before the commit
        # only means redelivery, which the inbox and the barrier absorb.
        self._dirty.add(partition)
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_dirty())

    async def _commit_dirty(self) -> None:
        while self._dirty and not self._closed:
            partitions = list(self._dirty)
            self._dirty.clear()
            await self._commit(partitions)

    def _nacked(self, partition: _Partition, offset: int) -> None:
        if partition.revoked or self._closed:
            return  # the next owner starts from the committed offset anyway
        partition.epoch += 1
        self._ready = deque(entry for entry in self._ready if entry[1] is not partition)
        # Back to the lowest unsettled offset, not to this one: when a batch is handed
        # back offset by offset, seeking to each in turn would leave the partition
        # past the earlier ones, unsettled and never delivered again. What is refetched
        # and still in flight or already settled is skipped.
        target = min(partition.pending, default=offset)
        try:
            self._consumer.seek(partition.tp, min(target, offset))
        except (KafkaError, ValueError) as exc:
            log.warning("cannot seek %s back to %d: %s", partition.tp, offset, exc)

    async def _commit(self, partitions: Iterable[_Partition]) -> None:
        """Commit the contiguous settled prefix; a failure only means redelivery."""
        async with self._commit_lock:
            marks = {
                partition: mark
                for partition in partitions
                if not partition.revoked and (mark := partition.to_commit()) is not None
            }
            if not marks:
                return
            offsets = {p.tp: (offset, f"{_DELIVERED}{to}") for p, (offset, to) in marks.items()}
            try:
                async with asyncio.timeout(self.transport.request_timeout_ms / 1000):
                    await self._consumer.commit(offsets)
            except (KafkaError, TimeoutError) as exc:
                log.warning(
                    "commit on %s failed, those messages will be redelivered: %s",
                    self.topic,
                    exc or type(exc).__name__,
                )
                return
            for partition, mark in marks.items():
                partition.committed = mark
                partition.settled = {o for o in partition.settled if o >= mark[0]}

    async def _revoke(self, revoked: Iterable[Any]) -> None:
        lost = [self._partitions[tp] for tp in revoked if tp in self._partitions]
        await self._commit(lost)
        for partition in lost:
            partition.revoked = True
            del self._partitions[partition.tp]
        self._ready = deque(entry for entry in self._ready if not entry[1].revoked)

    # -- marks ----------------------------------------------------------------------

    @property
    def _mark_timeout(self) -> float:
        return min(5.0, self.transport.request_timeout_ms / 1000)

    async def mark(self) -> Mark:
        """The end offsets of every partition of the topic, not only of the assigned
        ones: a partition another member owns (or none does, after its owner died)
        holds replies just the same, so the mark covers the whole group's work."""
        try:
            async with asyncio.timeout(self._mark_timeout):
                ids = self._consumer.partitions_for_topic(self.topic)
                if not ids:
                    raise TransportError(f"no metadata for {self.topic} yet")
                tps = [TopicPartition(self.topic, p) for p in sorted(ids)]
                ends = await self._consumer.end_offsets(tps)
        except (KafkaError, OSError, TimeoutError) as exc:
            raise TransportError(
                f"cannot read the end offsets of {self.topic}: {exc or type(exc).__name__}"
            ) from exc
        return Mark(0, dict(ends))

    def _unbooked(self) -> bool:
        """Whether a fetch returned records not yet booked as pending: aiokafka moves
        the position when ``getmany`` returns, and ``_fill`` books the batch a loop
        step later, so in between the position runs ahead of what is in hand."""
        return self._fetch is not None and self._fetch.done() and not self._fetch.cancelled()

    async def settled_past(self, mark: Mark) -> bool:
        """Assigned partitions by this consumer's books (what is fetched and unsettled,
        else its position), the others by the group's committed offsets."""
        ends: dict[Any, int] = mark.position
        try:
            async with asyncio.timeout(self._mark_timeout):
                assigned = self._consumer.assignment()
                others = []
                for tp, end in ends.items():
                    if tp not in assigned:
                        others.append(tp)
                        continue
                    # The position first (it may wait for a reset), then the books,
                    # with no await between: read the other way round, a fetch booked
                    # meanwhile would be counted by the position and missed by pending.
                    position = await self._consumer.position(tp)
                    if self._unbooked():
                        return False
                    partition = self._partitions.get(tp)
                    if partition is not None and partition.pending:
                        done = min(partition.pending)
                    else:
                        done = position
                    if done < end:
                        return False
                if not others:
                    return True
                committed = await self.transport.admin().list_consumer_group_offsets(
                    self.group, partitions=others
                )
        except (KafkaError, OSError, TimeoutError, TransportError) as exc:
            log.debug("cannot tell whether %s is settled past a mark: %s", self.topic, exc)
            return False
        for tp in others:
            point = committed.get(tp)
            if ends[tp] > 0 and (point is None or point.offset < ends[tp]):
                return False
        return True

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._fetch is not None:
            self._fetch.cancel()
        if self._committer is not None:
            await asyncio.wait([self._committer])
        self._dirty.clear()
        await self._commit(list(self._partitions.values()))
        for partition in self._partitions.values():
            partition.revoked = True
        self._partitions.clear()
        self._ready.clear()
        await self._consumer.stop()


class KafkaTransport:
    """The :class:`~engine.transport.base.Transport` over Kafka."""

    def __init__(
        self,
        bootstrap_servers: str | Sequence[str],
        *,
        options: KafkaOptions | None = None,
        required_topics: Iterable[str] = (),
        dead_letter_topic: str = "saga.dead-letters",
        publish_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        request_timeout_ms: int = 10_000,
        # 0: a batch leaves as soon as it is ready, which is what a saga waits for.
        # Batching does not suffer: the producer has one request in flight per broker,
        # and whatever is sent meanwhile goes out together in the next one.
        linger_ms: int = 0,
        max_poll_records: int = 100,
        client_id: str = "saga-engine",
    ) -> None:
        """``options``: security, topic creation and the producer's size limit (the
        ``SAGA_KAFKA_*`` settings), checked here: unusable ones raise ConfigError.
        ``required_topics``: every topic this process will use; :meth:`connect` makes
        sure they exist (creates them, or checks in no-create mode)."""
        if isinstance(bootstrap_servers, str):
            bootstrap_servers = bootstrap_servers.split(",")
        self.bootstrap_servers = [s.strip() for s in bootstrap_servers if s.strip()]
        self.options = options = options or KafkaOptions()
        options.check()
        #: The security arguments of every aiokafka client this transport makes
        #: (with the SASL password: never shown).
        self._security = security_arguments(options)
        self.required_topics = sorted(set(required_topics))
        self.dead_letter_topic = dead_letter_topic
        self.publish_timeout = publish_timeout
        self.connect_timeout = connect_timeout
        self.request_timeout_ms = request_timeout_ms
        self.linger_ms = linger_ms
        self.max_poll_records = max_poll_records
        self.client_id = client_id
        self._producer: Any = None
        self._admin: Any = None
        self._topics: set[str] = set()
        self._topics_lock = asyncio.Lock()
        self._subscriptions: list[KafkaSubscription] = []

    @property
    def _where(self) -> str:
        return f"Kafka at {','.join(self.bootstrap_servers)}"

    def _new_producer(self) -> Any:
        return AIOKafkaProducer(
            bootstrap_servers=self.bootstrap_servers,
            client_id=self.client_id,
            enable_idempotence=True,
            acks="all",
            linger_ms=self.linger_ms,
            request_timeout_ms=self.request_timeout_ms,
            # The producer refuses larger messages itself; the broker enforces its own
            # limit (the topic's max.message.bytes, 1 MiB by default) on what it is sent.
            max_request_size=self.options.max_request_size,
            **self._security,
        )

    async def connect(self) -> None:
        """Start the producer and the admin client, then make sure the required topics
        exist. A refused TLS handshake or login raises ConfigError (retrying cannot
        help); an unreachable broker TransportError."""
        if self._producer is not None:
            return
        producer = self._new_producer()
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self.bootstrap_servers,
            client_id=f"{self.client_id}-admin",
            request_timeout_ms=self.request_timeout_ms,
            **self._security,
        )
        deadline = asyncio.get_running_loop().time() + self.connect_timeout
        try:
            async with asyncio.timeout_at(deadline):
                await producer.start()
                await admin.start()
        except (KafkaError, OSError, TimeoutError) as exc:
            await producer.stop()
            await admin.close()
            if not isinstance(exc, TimeoutError):
                await self._raise_if_refused(deadline)
            raise TransportError(
                f"cannot reach {self._where}: {exc or type(exc).__name__}"
            ) from exc
        self._producer, self._admin = producer, admin
        try:
            await self.ensure_topics(self.required_topics)
        except BaseException:
            await self.close()
            raise

    async def _raise_if_refused(self, deadline: float) -> None:
        """Raise ConfigError if a broker refuses this client's TLS or login.

        aiokafka logs why it could not bootstrap and raises only "Unable to bootstrap",
        so one more connection to each bootstrap server (as the clients make it)
        finds the reason, while the connect bound lasts."""
        for server in self.bootstrap_servers:
            host, _, port = server.rpartition(":")
            try:
                async with asyncio.timeout_at(deadline):
                    conn = await create_conn(
                        host,
                        int(port),
                        client_id=self.client_id,
                        request_timeout_ms=self.request_timeout_ms,
                        **self._security,
                    )
                    conn.close()
            except TimeoutError:
                return
            except Exception as exc:  # whatever the client raised, classified below
                refusal = _refusal(exc, server, self.options)
                if refusal is not None:
                    raise ConfigError(refusal) from None

    async def close(self) -> None:
        for subscription in self._subscriptions:
            await subscription.close()
        self._subscriptions.clear()
        producer, admin = self._producer, self._admin
        self._producer = self._admin = None
        if producer is not None:
            await producer.stop()
        if admin is not None:
            await admin.close()

    def admin(self) -> Any:
        if self._admin is None:
            raise TransportError("Kafka transport is not connected")
        return self._admin

    async def has_readers(self, destination: str) -> bool:
        """Whether some consumer group committed offsets on topic ``destination``:
        one reads it (or did, and resumes there when it comes back).

        Committed offsets rather than live members: a reader that is down for a
        deploy still counts, and ours commit once they handled a message (the relay
        asks a while after publishing). At most one request per group, off the hot
        path: the relay asks at most once per ``SAGA_RELAY_READER_CHECK_DELAY`` per
        topic, and only while publishes to it continue."""
        admin = self.admin()
        groups = [group for group, *_ in await admin.list_consumer_groups()]
        # The groups named most like the topic first (a deployment's groups and topics
        # share its prefix): one of them that committed there answers, and the
        # cluster's other groups are asked only if none did. The answer is the same.
        likeliest = _closest(groups, destination)
        for wave in (sorted(likeliest), [g for g in groups if g not in likeliest]):
            offsets = await asyncio.gather(
                *(admin.list_consumer_group_offsets(g) for g in wave), return_exceptions=True
            )
            if any(
                any(tp.topic == destination for tp in committed)
                for committed in offsets
                if not isinstance(committed, BaseException)
            ):
                return True
        return False

    def nobody_reads(self, destination: str) -> str:
        """What :meth:`has_readers` saying no means here, for the relay's warning."""
        return f"no consumer group reads {destination}"

    async def ensure_topics(self, names: Iterable[str]) -> None:
        """Create missing topics as the options say (idempotent); in no-create mode,
        raise TransportError naming those that do not exist."""
        missing = sorted(set(names) - self._topics)
        if not missing:
            return
        async with self._topics_lock:
            missing = sorted(set(missing) - self._topics)
            if not missing:
                return
            if self.options.create_topics:
                await self._create(missing)
            else:
                await self._require(missing)
            self._topics.update(missing)

    async def _create(self, names: list[str]) -> None:
        try:
            response = await self.admin().create_topics([self._new_topic(n) for n in names])
        except (KafkaError, OSError) as exc:
            raise TransportError(f"cannot create topics {names} on {self._where}: {exc}") from exc
        for entry in response.topic_errors:
            name, code = entry[0], entry[1]
            if code and for_code(code) is not TopicAlreadyExistsError:
                error = for_code(code)
                detail = entry[2] if len(entry) > 2 and entry[2] else error.__name__
                if error in (TopicAuthorizationFailedError, ClusterAuthorizationFailedError):
                    detail += (
                        f" (not allowed to create topics: create them and set "
                        f"{setting('create_topics')}=false)"
                    )
                raise TransportError(f"cannot create topic {name} on {self._where}: {detail}")
        await self._await_visible(names)

    def _new_topic(self, name: str) -> Any:
        options = self.options
        configs = {}
        if options.min_insync_replicas is not None:
            configs["min.insync.replicas"] = str(options.min_insync_replicas)
        factor = options.replication_factor
        topic = NewTopic(name, options.partitions, factor or 1, topic_configs=configs)
        if factor is None:
            # -1: the broker's default.replication.factor (KIP-464, Kafka 2.4 and later).
            # aiokafka's NewTopic refuses -1 without replica assignments; the broker
            # takes it in every CreateTopics version aiokafka sends.
            topic.replication_factor = -1
        return topic

    async def _require(self, names: list[str]) -> None:
        """No-create mode: every topic in ``names`` must exist already."""
        try:
            # Listing, not describing: a metadata request that names a missing topic
            # creates it on a broker with auto.create.topics.enable.
            existing = set(await self.admin().list_topics())
        except (KafkaError, OSError) as exc:
            raise TransportError(f"cannot list the topics on {self._where}: {exc}") from exc
        absent = [n for n in names if n not in existing]
        if absent:
            raise TransportError(
                f"{', '.join(absent)}: no such topic on {self._where}, and "
                f"{setting('create_topics')} is false: create "
                f"{'it' if len(absent) == 1 else 'them'} (or let this user describe "
                f"{'it' if len(absent) == 1 else 'them'})"
            )

    async def _await_visible(self, names: list[str]) -> None:
        """Wait until the broker's metadata lists ``names`` with a leader per partition.

        Creating a topic returns before every broker knows it. A consumer that joins its
        group in between is assigned none of the topic's partitions, and notices them
        only at its next metadata refresh (``metadata_max_age_ms``: five minutes).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        while True:
            try:
                described = await self.admin().describe_topics(names)
            except (KafkaError, OSError) as exc:
                described, problem = [], str(exc)
            else:
                problem = "not in the broker's metadata yet"
            visible = {
                t["topic"]
                for t in described
                if not t["error_code"]
                and t["partitions"]
                and all(p["leader"] >= 0 for p in t["partitions"])
            }
            if visible >= set(names):
                return
            if loop.time() >= deadline:
                raise TransportError(
                    f"topics {sorted(set(names) - visible)} on {self._where}: {problem} "
                    f"after {self.connect_timeout:g}s"
                )
            await asyncio.sleep(0.05)

    async def publish(self, messages: Sequence[Message]) -> None:
        if not messages:
            return
        if self._producer is None:
            raise TransportError("Kafka transport is not connected")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.publish_timeout
        refused = {
            i: f"invalid topic name {m.destination!r}"
            for i, m in enumerate(messages)
            if not _TOPIC_NAME.fullmatch(m.destination) or m.destination in (".", "..")
        }
        todo = [i for i in range(len(messages)) if i not in refused]
        try:
            async with asyncio.timeout_at(deadline):
                await self.ensure_topics({messages[i].destination for i in todo})
        except TimeoutError:
            raise PublishError(
                f"{self._where} did not take {len(messages)} messages "
                f"within {self.publish_timeout:g}s"
            ) from None
        gap = False
        while todo:
            producer = self._producer
            if producer is None:
                raise TransportError("Kafka transport is not connected")
            declined, failures = await self._send(producer, messages, todo, deadline)
            for i, exc in declined.items():
                refused[i] = _reason(exc, messages[i])
            for i, exc in failures.items():
                if isinstance(exc, _REFUSED_FOR_GOOD):
                    refused[i] = _reason(exc, messages[i])
                    gap = True
            broken = [i for i, exc in failures.items() if isinstance(exc, _PRODUCER_BROKEN)]
            others = [e for i, e in failures.items() if i not in refused and i not in broken]
            if others or (broken and not gap):
                await self._replace_if_broken(producer, failures[broken[0]] if broken else None)
                error = others[0] if others else failures[broken[0]]
                raise PublishError(f"{self._where} refused a publish: {error}")
            if gap:
                # A batch the broker refused leaves a gap in the idempotent producer's
                # sequence of its partition: the broker answers every later batch there
                # with OutOfOrderSequenceNumber, in this call (sent again below) or the
                # next. A fresh producer starts its sequences from zero.
                await self._replace(producer, "the broker refused a batch of its sequence")
                if broken and self._producer is producer:
                    raise PublishError(f"{self._where} refused a publish: {failures[broken[0]]}")
            todo = broken
        if refused:
            raise MessagesRefused(refused, len(messages), self._where)

    async def _send(
        self, producer: Any, messages: Sequence[Message], indexes: Sequence[int], deadline: float
    ) -> tuple[dict[int, BaseException], dict[int, BaseException]]:
        """Send ``messages[i]`` for each index and wait for their delivery. Returns the
        refusals of the client itself (over ``max_request_size``: never sent) and the
        failed deliveries, by index; an unconfirmed delivery or any other error of the
        client raises."""
        loop = asyncio.get_running_loop()
        futures: dict[int, asyncio.Future[Any]] = {}
        declined: dict[int, BaseException] = {}
        try:
            async with asyncio.timeout_at(deadline):
                for i in indexes:
                    m = messages[i]
                    try:
                        futures[i] = await producer.send(
                            m.destination,
                            m.body,
                            key=m.key.encode(),
                            headers=[(k, v.encode()) for k, v in m.headers.items()],
                        )
                    except _REFUSED_FOR_GOOD as exc:
                        declined[i] = exc
        except TimeoutError:
            _abandon(futures.values())
            raise PublishError(
                f"{self._where} did not take {len(messages)} messages "
                f"within {self.publish_timeout:g}s"
            ) from None
        except KafkaError as exc:
            _abandon(futures.values())
            await self._replace_if_broken(producer, exc)
            raise PublishError(f"{self._where} refused a publish: {exc}") from exc
        if futures:
            # Waiting on the delivery futures without cancelling them: a late ack is
            # harmless (the outbox re-sends, the inbox absorbs the duplicate).
            remaining = max(0.0, deadline - loop.time())
            _, not_done = await asyncio.wait(futures.values(), timeout=remaining)
            if not_done:
                _abandon(not_done)
                raise PublishError(
                    f"{self._where} did not confirm {len(not_done)} of {len(messages)} "
                    f"messages within {self.publish_timeout:g}s"
                )
        failures: dict[int, BaseException] = {}
        for i, future in futures.items():
            error = future.exception()
            if error is not None:
                failures[i] = error
        return declined, failures

    async def _replace_if_broken(self, producer: Any, error: BaseException | None) -> None:
        """Swap in a fresh producer when ``producer`` can never send again; the
        caller's retry then goes through."""
        if isinstance(error, _PRODUCER_BROKEN):
            await self._replace(producer, f"the producer is unusable ({error!r})")

    async def _replace(self, producer: Any, why: str) -> None:
        """Swap in a fresh producer (new producer id, sequences from zero) for
        ``producer``, unless another call did already."""
        if producer is not self._producer:
            return
        log.warning("%s: %s; starting a new one", self._where, why)
        fresh = self._new_producer()
        try:
            async with asyncio.timeout(self.connect_timeout):
                await fresh.start()
        except (KafkaError, OSError, TimeoutError) as exc:
            await fresh.stop()
            log.warning(
                "%s: no new producer yet, the next publish tries again: %s", self._where, exc
            )
            return
        self._producer = fresh
        try:  # a dead sender flushes nothing, a live one what others sent meanwhile
            async with asyncio.timeout(self.connect_timeout):
                await producer.stop()
        except (KafkaError, OSError, TimeoutError) as exc:
            log.warning("%s: closing the replaced producer: %s", self._where, exc)

    async def subscribe(self, destination: str, *, group: str) -> KafkaSubscription:
        if self._producer is None:
            raise TransportError("Kafka transport is not connected")
        await self.ensure_topics([destination])
        subscription = KafkaSubscription(self, destination, group)
        await subscription.start()
        self._subscriptions.append(subscription)
        return subscription


def _closest(groups: Sequence[str], topic: str) -> set[str]:
    """The groups whose names begin most like ``topic`` (none if no name shares even
    its first character): those likeliest to read it."""
    shared = {group: _shared_start(group, topic) for group in groups}
    longest = max(shared.values(), default=0)
    return {group for group, n in shared.items() if n == longest > 0}


def _shared_start(a: str, b: str) -> int:
    """How many first characters ``a`` and ``b`` have in common."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def security_arguments(options: KafkaOptions) -> dict[str, Any]:
    """aiokafka's arguments for the options' protocol, TLS context and SASL login."""
    security: dict[str, Any] = {"security_protocol": options.security_protocol}
    context = options.ssl_context()
    if context is not None:
        security["ssl_context"] = context
    if options.uses_sasl and options.sasl_password is not None:
        security.update(
            sasl_mechanism=options.sasl_mechanism,
            sasl_plain_username=options.sasl_username,
            sasl_plain_password=options.sasl_password.get_secret_value(),
        )
    return security


def _refusal(error: BaseException, server: str, options: KafkaOptions) -> str | None:
    """One line saying why ``server`` refused this client for good, or None when it
    may be only unreachable (a retry may get through)."""
    seen: list[BaseException] = []
    cause: BaseException | None = error
    while cause is not None and cause not in seen:  # "Connection closed" has the TLS alert
        seen.append(cause)
        cause = cause.__cause__ or cause.__context__
    for each in seen:
        refusal = _refused_by(each, server, options)
        if refusal is not None:
            return refusal
    return None


def _refused_by(error: BaseException, server: str, options: KafkaOptions) -> str | None:
    if isinstance(error, ssl.SSLCertVerificationError):
        host = server.rpartition(":")[0]
        if error.verify_code in _NAME_MISMATCH:
            return (
                f"Kafka at {server}: its TLS certificate is not valid for {host!r}: connect "
                "by a name the certificate holds"
            )
        trusted = (
            f"the CA in {setting('ssl_cafile')}"
            if options.ssl_cafile
            else f"the system's CAs (set {setting('ssl_cafile')})"
        )
        return (
            f"Kafka at {server}: its TLS certificate is not trusted by {trusted}: "
            f"{error.verify_message}"
        )
    if isinstance(error, ssl.SSLError) and not isinstance(error, _TLS_CUT):
        said = f"Kafka at {server}: TLS handshake failed: {error.reason or error}"
        if error.reason in _CLIENT_CERTIFICATE_REFUSED:
            said += (
                " (the broker wants a client certificate it trusts: "
                f"{setting('ssl_certfile')}, {setting('ssl_keyfile')})"
            )
        return said
    if isinstance(error, _SASL_REFUSED):
        said = " ".join(str(error).split()) or type(error).__name__
        return (
            f"Kafka at {server} refused the {options.sasl_mechanism} login of "
            f"{options.sasl_username!r}: {said}"
        )
    return None


def _reason(error: BaseException, message: Message) -> str:
    """A refusal in one line: what the broker (or the client) said, by name, and the
    size of what it refused (the broker's answer does not say)."""
    text = " ".join(str(error).split())
    name = type(error).__name__
    said = text if name in text else f"{name}: {text}" if text else name
    return f"{said} (a body of {len(message.body)} bytes to {message.destination})"


def _abandon(futures: Iterable[asyncio.Future[Any]]) -> None:
    """No longer waited for: their results are retrieved whenever they come."""
    for future in futures:
        future.add_done_callback(_consume_result)


def _consume_result(future: asyncio.Future[Any]) -> None:
    """Retrieve a late delivery result so asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()
