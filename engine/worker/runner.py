"""Runs a :class:`Worker` against a transport and its barrier (its database).

Per delivery: handle it behind the barrier in one database transaction, commit,
publish the reply and wait for the broker's confirmation, and only then acknowledge
the command. A crash anywhere before the ack means redelivery, which the barrier turns
into a re-sent reply without a second effect.

A batch of commands shares one transaction, each handler in a savepoint of its own, so
a handler that raises undoes only its own writes and runs no other handler again. A
handler runs twice for one delivered attempt only when its writes did not commit: a
crash, the batch's transaction failing (then each command is handled again on its own),
or a copy of the command delivered while the first was still being handled.

On a database with one write lock for everything (SQLite, the embedded store) the
transaction must not be open while a handler waits on something slow, or every other
writer waits with it: there the barrier is read before the transaction, which then
begins at the handler's first statement, and each command of a batch has its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager
from time import monotonic as now
from typing import Any

from engine._aio import batched, wait_either
from engine.errors import DecodeError, SagaError
from engine.faults import crashpoint
from engine.limits import DEFAULT_LIMITS, Limits
from engine.messages import Envelope, MessageKind, Outcome, decode, encode
from engine.signing import NO_SIGNING, Signing
from engine.telemetry import metrics
from engine.telemetry.logs import saga_context
from engine.telemetry.tracing import inject, process_span
from engine.topology import Topology
from engine.transport.base import Delivery, Message, Transport
from engine.worker.base import Barrier, ConcurrentDuplicate, Outcomes
from engine.worker.worker import Registration, Worker

log = logging.getLogger("saga.worker")

#: On a one-writer database, a handler's transaction open longer than this (seconds)
#: is logged: everything else that writes waited for it.
LONG_HOLD = 1.0

#: A handled delivery and the reply to publish before acknowledging it.
Handled = tuple[Delivery, Message]


class WorkerRunner:
    """Runs one :class:`Worker` against its command destination: each command's handler
    in a database transaction with the participant barrier (a duplicate runs once, a
    compensation before its action is a no-op, an action after it is refused), then the
    reply, published before the delivery is acknowledged. ``sagactl worker`` runs one.

    ``barrier`` is the participant's database seen through the barrier protocol
    (:class:`~engine.worker.barrier.SqlBarrier` over a SQLAlchemy engine).
    """

    def __init__(
        self,
        worker: Worker,
        transport: Transport,
        barrier: Barrier,
        *,
        topology: Topology | None = None,
        concurrency: int = 1,
        batch_size: int = 100,
        messaging_system: str = "memory",
        limits: Limits = DEFAULT_LIMITS,
        signing: Signing = NO_SIGNING,
    ) -> None:
        self.worker = worker
        self.transport = transport
        self.topology = topology or Topology()
        self.barrier = barrier
        self.concurrency = concurrency
        #: Most commands handled in one transaction.
        self.batch_size = batch_size
        #: ``messaging.system`` trace attribute of the transport.
        self.messaging_system = messaging_system
        #: Commands over them are dead-lettered; replies over them become failures.
        self.limits = limits
        #: Checks every command before it is decoded; signs every reply.
        self.signing = signing
        self.handled = 0
        #: True while attached to the command destination (the daemon's readiness check).
        self.consuming = False
        #: Pause after a delivery is handed back (its reply could not be published):
        #: doubles per consecutive failure up to the cap, so redelivery is no hot loop.
        self.error_backoff = 0.25
        self.max_error_backoff = 5.0
        self._failures = 0
        self._stop = asyncio.Event()

    @property
    def one_writer(self) -> bool:
        """Keep handlers' waiting out of transactions (see the module's docstring)."""
        return self.barrier.one_writer

    @property
    def destination(self) -> str:
        """Where this worker's commands and compensations arrive."""
        return self.topology.commands(self.worker.name)

    @property
    def group(self) -> str:
        """The consumer group every replica of this worker shares."""
        return self.topology.group(f"worker-{self.worker.name}")

    def stop(self) -> None:
        """Ask :meth:`run` to finish what is in flight and return."""
        self._stop.set()

    async def run(self) -> None:
        """Consume this participant's commands until :meth:`stop`, then drain."""
        try:
            await self._run()
        finally:
            # Cleared only now: a stop() that came before run() got going is kept.
            self._stop.clear()

    async def _run(self) -> None:
        subscription = await self.transport.subscribe(self.destination, group=self.group)
        self.consuming = True
        slots = asyncio.Semaphore(self.concurrency)
        in_flight: set[asyncio.Task[None]] = set()

        async def one(batch: list[Delivery]) -> None:
            try:
                await self.handle_deliveries(batch)
            except SagaError as exc:
                # e.g. the dead-letter destination refused: the broker redelivers.
                log.error("worker %s: delivery not settled: %s", self.worker.name, exc)
                await asyncio.sleep(1.0)
            finally:
                slots.release()

        async def consume() -> None:
            # What arrived while every slot was busy is handled as one batch: one
            # transaction, one barrier query, one publish of the replies.
            async for batch in batched(subscription, self.batch_size):
                await slots.acquire()
                task = asyncio.create_task(one(batch))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)

        consumer = asyncio.create_task(consume(), name=f"worker-{self.worker.name}")
        stopper = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait([consumer, stopper], return_when=asyncio.FIRST_COMPLETED)
            if consumer.done() and consumer.exception() is not None:
                raise consumer.exception()  # type: ignore[misc]
        finally:
            self.consuming = False
            consumer.cancel()
            stopper.cancel()
            if in_flight:  # drain: finish what was started, then let go of the rest
                await asyncio.wait(in_flight, timeout=30)
            await subscription.close()

    async def handle_deliveries(self, deliveries: Sequence[Delivery]) -> None:
        """Handle a batch in one transaction, each handler in a savepoint of its own: a
        handler that raises undoes only its own writes and replies its error, the others
        commit together. Only when the transaction itself fails (its commit, the
        connection, a concurrent duplicate) is each command handled again on its own,
        and then the handlers that ran in it run a second time (their writes were rolled
        back, their calls to other services were not): counted in
        ``saga.worker.batch_redone``."""
        batch: list[tuple[Delivery, Envelope, Registration]] = []
        for delivery in deliveries:
            envelope = await self._decode(delivery)
            if envelope is None:
                continue
            registration = self.worker.registration(envelope.kind, envelope.name)
            if registration is None:
                await self._handle_one(delivery, envelope)
                continue
            batch.append((delivery, envelope, registration))
        if not batch:
            return
        if len(batch) == 1 or self.one_writer:
            await self._handle_each(batch)
            return
        try:
            handled = await self._handle_together(batch)
        except Exception as exc:
            log.warning(
                "worker %s: the transaction of a batch of %d failed, handling one by one "
                "(their handlers run again): %r",
                self.worker.name,
                len(batch),
                exc,
            )
            metrics.batch_redone.add(len(batch), {"saga.participant": self.worker.name})
            await self._handle_each(batch)
            return
        for _, envelope, _ in batch:
            crashpoint("worker.after_commit")
            metrics.handled.add(
                1, {"saga.participant": self.worker.name, "saga.kind": envelope.kind}
            )
        await self._send_and_settle(handled)

    async def _handle_each(self, batch: Sequence[tuple[Delivery, Envelope, Registration]]) -> None:
        """Each command in its own transaction; the replies published together."""
        known: Outcomes | None = None
        if self.one_writer and len(batch) > 1:
            try:
                known = await self.barrier.recorded(self.worker.name, [e for _, e, _ in batch])
            except Exception as exc:  # each command reads its own and replies its error
                log.warning("worker %s: barrier read failed: %r", self.worker.name, exc)
        handled: list[Handled] = []
        for delivery, envelope, _ in batch:
            with saga_context(envelope.saga_id, envelope.step), self._span(envelope):
                one = await self._handle(delivery, envelope, known)
            metrics.handled.add(
                1, {"saga.participant": self.worker.name, "saga.kind": envelope.kind}
            )
            if one is not None:
                handled.append(one)
        if handled:
            await self._send_and_settle(handled)

    async def _handle_together(
        self, batch: Sequence[tuple[Delivery, Envelope, Registration]]
    ) -> list[Handled]:
        handled: list[Handled] = []
        envelopes = [envelope for _, envelope, _ in batch]
        async with self.barrier.transaction(self.worker.name, envelopes, limits=self.limits) as tx:
            for delivery, envelope, registration in batch:
                with saga_context(envelope.saga_id, envelope.step), self._span(envelope):
                    try:
                        reply = await tx.handle(registration, envelope)
                    except Exception as exc:
                        if not await tx.intact():
                            raise  # the batch is lost: no handler runs in it any more
                        # Its savepoint rolled back; the others go on and commit.
                        reply = self._raised(envelope, exc)
                    handled.append((delivery, self._reply_message(reply)))
        return handled

    async def handle_delivery(self, delivery: Delivery) -> None:
        """Handle one delivered command, as the consumer handles each batch."""
        envelope = await self._decode(delivery)
        if envelope is not None:
            await self._handle_one(delivery, envelope)

    async def _decode(self, delivery: Delivery) -> Envelope | None:
        """The command in ``delivery``, or None when it was dead-lettered (undecodable,
        or not signed as this worker requires)."""
        try:
            self.signing.check(delivery.message, "command")
            envelope = decode(delivery.message.body, self.limits)
        except DecodeError as exc:
            log.error("worker %s dead-letters a message: %s", self.worker.name, exc)
            await delivery.dead_letter(str(exc))
            return None
        if envelope.kind is MessageKind.REPLY:
            await delivery.dead_letter(f"worker {self.worker.name!r} takes commands, not replies")
            return None
        return envelope

    def _span(self, envelope: Envelope) -> AbstractContextManager[Any]:
        return process_span(
            envelope,
            system=self.messaging_system,
            destination=self.destination,
            group=self.group,
        )

    async def _handle_one(self, delivery: Delivery, envelope: Envelope) -> None:
        with saga_context(envelope.saga_id, envelope.step), self._span(envelope):
            handled = await self._handle(delivery, envelope)
            if handled is not None:
                await self._send_and_settle([handled])
        metrics.handled.add(1, {"saga.participant": self.worker.name, "saga.kind": envelope.kind})

    async def _handle(
        self, delivery: Delivery, envelope: Envelope, known: Outcomes | None = None
    ) -> Handled | None:
        """Handle one command in its own transaction; return its reply to send, or
        None when the delivery was handed back (a concurrent duplicate).
        ``known``: barrier rows read ahead (see :meth:`_guarded`)."""
        registration = self.worker.registration(envelope.kind, envelope.name)
        if registration is None:
            # Nothing to run it: the step fails now, naming the cause, instead of
            # waiting for its timeout. Routine for a saga, so no dead letter.
            reason = (
                f"worker {self.worker.name!r} has no handler for {envelope.kind} {envelope.name!r}"
            )
            log.error("%s (saga %s)", reason, envelope.saga_id)
            return (delivery, self._reply_message(envelope.reply(Outcome.FAILURE, error=reason)))
        try:
            reply = await self._guarded(registration, envelope, known)
        except ConcurrentDuplicate:
            # A concurrent delivery of the same message won the barrier row: try later,
            # when this one will find the row and just re-send the reply.
            await delivery.nack()
            await self._pause()
            return None
        except Exception as exc:
            reply = self._raised(envelope, exc)
        else:
            crashpoint("worker.after_commit")
        return (delivery, self._reply_message(reply))

    def _raised(self, envelope: Envelope, exc: Exception) -> Envelope:
        """The reply to a command whose handler raised ``exc``: an error, on every
        attempt, the last one too. The engine retries or, out of attempts, fails the
        step; a dead letter is for messages nobody can take, not a handler that raised."""
        log.warning(
            "worker %s: %s %s of saga %s raised %r",
            self.worker.name,
            envelope.kind,
            envelope.name,
            envelope.saga_id,
            exc,
        )
        return envelope.reply(Outcome.ERROR, error=f"{type(exc).__name__}: {exc}")

    async def _guarded(
        self, registration: Registration, envelope: Envelope, known: Outcomes | None
    ) -> Envelope:
        """The reply to ``envelope``, handled behind the barrier in its own transaction.

        On a one-writer database the barrier rows are read ahead (``known``, shared by
        a batch and extended by each commit), so the transaction begins only at the
        handler's first statement: what it awaits before that holds up no other writer.
        """
        if self.one_writer and known is None:
            known = await self.barrier.recorded(self.worker.name, [envelope])
        async with self.barrier.transaction(
            self.worker.name, [envelope], known=known, limits=self.limits
        ) as tx:
            reply = await tx.handle(registration, envelope)
        began = tx.began
        if self.one_writer and began is not None and now() - began > LONG_HOLD:
            log.warning(
                "worker %s: %s %s of saga %s kept the database's one write lock %.1fs, "
                "and every other writer waited: do a handler's slow work before its first "
                "statement on ctx.session",
                self.worker.name,
                envelope.kind,
                envelope.name,
                envelope.saga_id,
                now() - began,
            )
        return reply

    async def _send_and_settle(self, handled: Sequence[Handled]) -> None:
        """Publish the replies in one go, then acknowledge each delivery. If the broker
        refused the replies, every delivery goes back to it (the barrier re-sends their
        stored outcomes) after a pause."""
        try:
            await self.transport.publish([reply for _, reply in handled])
        except SagaError as exc:
            log.warning("worker %s could not send replies, will redo: %s", self.worker.name, exc)
            for delivery, _ in handled:
                await delivery.nack()
            await self._pause()
            return
        for delivery, _ in handled:
            crashpoint("worker.after_reply")
            self.handled += 1
            self._failures = 0
            await delivery.ack()

    async def _pause(self) -> None:
        delay = min(self.max_error_backoff, self.error_backoff * 2**self._failures)
        self._failures += 1
        await wait_either(self._stop, None, delay)

    def _reply_message(self, reply: Envelope) -> Message:
        # The reply continues the trace from this worker's span, not the sender's.
        reply = reply.model_copy(update={"headers": inject(reply.headers)})
        message = Message(self.topology.replies, reply.saga_id, encode(reply), reply.headers)
        return self.signing.sign(message)  # the one place a worker's messages leave it
