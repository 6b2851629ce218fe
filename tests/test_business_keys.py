"""Business keys (issue 13): a saga declares what it is about, the keys are stored
with it at start, and lists filter by them (with status, name, version and time
ranges, combined) and page with a stable cursor; on SQLite and real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from pydantic import BaseModel
from sqlalchemy import func, select, update

from engine.cli.app import cli
from engine.client import SagaClient
from engine.database import create_engine, upgrade
from engine.definition import Child, Compensation, Saga, Step
from engine.errors import DefinitionError, LimitError
from engine.limits import KEY_VALUE_LENGTH
from engine.registry import SagaRegistry
from engine.statemachine import child_id
from engine.states import SagaStatus
from engine.store.schema import outbox, saga_keys, sagas
from engine.store.sql import SqlSagaStore
from engine.views import SagaCursor, TimeRange
from sagas.large_order import large_order
from sagas.order import place_order

T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


class Order(BaseModel):
    order_id: str
    customer_id: str
    note: str | None = None


def _step(name: str) -> Step:
    return Step(
        name=name,
        participant="shop",
        command=lambda ctx: {"order": ctx.saga_id},
        compensation=Compensation(f"undo_{name}", lambda ctx: {}),
    )


ORDER = Saga(
    name="keyed_order",
    version=1,
    input=Order,
    steps=[_step("reserve")],
    keys=("order_id", "customer_id", "note"),
)
#: Version 2 keys its sagas by the customer only.
ORDER_V2 = Saga(
    name="keyed_order", version=2, input=Order, steps=[_step("reserve")], keys=("customer_id",)
)


class Parcel(BaseModel):
    parcel: str


#: A child keyed by its own input; its parent by the order.
PARCEL = Saga(
    name="parcel",
    version=1,
    input=Parcel,
    steps=[_step("ship")],
    keys=lambda p: {"parcel_no": p.parcel.upper()},
)
PARENT = Saga(
    name="parent_order",
    version=1,
    input=Order,
    steps=[Child("send", saga=PARCEL, input=lambda ctx: {"parcel": f"p-{ctx.saga_id}"})],
    keys=("order_id",),
)
#: Its child's key would be over the limit: the step starting it fails instead.
OVERSIZED = Saga(
    name="oversized_parent",
    version=1,
    input=Order,
    steps=[Child("send", saga=PARCEL, input=lambda ctx: {"parcel": "p" * KEY_VALUE_LENGTH * 2})],
)
REGISTRY = SagaRegistry([ORDER, ORDER_V2, PARCEL, PARENT, OVERSIZED])


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def order(n: int, customer: str = "c1", **more: str) -> dict[str, str]:
    return {"order_id": f"o-{n}", "customer_id": customer, **more}


# -- definitions --------------------------------------------------------------------


def test_keys_are_checked_at_import_and_leave_the_fingerprint_alone() -> None:
    bare = Saga(name="keyed_order", version=1, input=Order, steps=[_step("reserve")])
    assert bare.fingerprint == ORDER.fingerprint
    assert place_order.keys == large_order.keys == ("customer_id",)
    refused = {
        "order_ref": "not a field of the input model Order",
        "Order_ID": "is not a name",
        "customer_id ": "is not a name",
    }
    for key, message in refused.items():
        with pytest.raises(DefinitionError, match=message):
            Saga(name="s", version=1, input=Order, steps=[_step("a")], keys=(key,))
    with pytest.raises(DefinitionError, match="sequence of input field names"):
        Saga(name="s", version=1, input=Order, steps=[_step("a")], keys="order_id")
    with pytest.raises(DefinitionError, match="named twice"):
        Saga(name="s", version=1, input=Order, steps=[_step("a")], keys=("order_id",) * 2)


def test_key_values_come_from_the_parsed_input_or_the_function() -> None:
    assert ORDER.business_keys(order(1, note="")) == {"order_id": "o-1", "customer_id": "c1"}
    assert PARCEL.business_keys({"parcel": "ab"}) == {"parcel_no": "AB"}
    bad = Saga(name="s", version=1, input=Order, steps=[_step("a")], keys=lambda o: {"x": 1})
    with pytest.raises(DefinitionError, match="must be text"):
        bad.business_keys(order(1))
    with pytest.raises(LimitError, match=f"limit is {KEY_VALUE_LENGTH}"):
        ORDER.business_keys(order(1, note="n" * (KEY_VALUE_LENGTH + 1)))
    # Kept as written (the key must find its saga), shown escaped by every reader.
    assert ORDER.business_keys(order(1, customer="a\nb"))["customer_id"] == "a\nb"
    with pytest.raises(LimitError, match="control character"):
        ORDER.business_keys(order(1, customer="a\x00b"))


def test_a_cursor_reads_back_and_refuses_garbage() -> None:
    cursor = SagaCursor(T0, "id.with.dots")
    assert SagaCursor.decode(cursor.encode()) == cursor
    assert len(SagaCursor(T0, "x" * 36).encode()) <= 48
    for text in ("", "abc", ".id", "zz!.id", "1." + "x" * 37):
        with pytest.raises(ValueError, match="not a cursor"):
            SagaCursor.decode(text)


# -- the store, both databases --------------------------------------------------------


async def test_keys_are_stored_at_start_and_found(any_store: SqlSagaStore) -> None:
    client = SagaClient(any_store, REGISTRY, clock=Clock())
    first = await client.start("keyed_order", order(1, note="gift"), version=1)
    second = await client.start("keyed_order", order(2), version=1)
    other = await client.start("keyed_order", order(1, customer="c2"), version=2)

    assert (await client.get(first)).keys == {
        "customer_id": "c1",
        "note": "gift",
        "order_id": "o-1",
    }
    assert (await client.get(other)).keys == {"customer_id": "c2"}  # v2's keys
    assert [s.id for s in await client.find(order_id="o-2")] == [second]
    assert [s.id for s in await client.find(order_id="o-1")] == [first]
    assert {s.id for s in await client.find(customer_id="c1")} == {first, second}
    assert [s.id for s in await client.find(order_id="o-1", customer_id="c1")] == [first]
    assert await client.find(order_id="o-1", customer_id="c2") == []
    assert await client.find(order_id="o-9") == []

    # Refused before anything is stored, with the limit named.
    with pytest.raises(LimitError, match="business key 'note'"):
        await client.start("keyed_order", order(3, note="n" * (KEY_VALUE_LENGTH + 1)), version=1)
    async with any_store.engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(sagas)) == 3


async def test_a_child_saga_gets_the_keys_of_its_own_definition(any_store: SqlSagaStore) -> None:
    client = SagaClient(any_store, REGISTRY, clock=Clock())
    parent = await client.start("parent_order", order(7))
    child = child_id(parent, "send", 1)
    assert (await client.get(parent)).keys == {"order_id": "o-7"}
    assert (await client.get(child)).keys == {"parcel_no": f"P-{parent}".upper()}
    assert [s.id for s in await client.find(parcel_no=f"P-{parent}".upper())] == [child]

    refused = await client.get(await client.start("oversized_parent", order(8)))
    assert refused.status is SagaStatus.COMPENSATED
    assert refused.steps[0].error is not None
    assert refused.steps[0].error.startswith("child saga keys refused: saga 'parcel': ")


async def test_filters_combine(any_store: SqlSagaStore) -> None:
    clock = Clock()
    client = SagaClient(any_store, REGISTRY, clock=clock)
    ids = []
    for n in range(6):
        clock.now = T0 + timedelta(hours=n)
        ids.append(await client.start("keyed_order", order(n, f"c{n % 2}"), version=1 + n % 2))
    async with any_store.engine.begin() as conn:
        await conn.execute(
            update(sagas)
            .where(sagas.c.id.in_(ids[2:4]))
            .values(status="completed", updated_at=T0 + timedelta(days=1))
        )

    async def listed(**filters: object) -> list[str]:
        return [s.id for s in await client.list(**filters)]  # type: ignore[arg-type]

    hours = TimeRange(T0 + timedelta(hours=1), T0 + timedelta(hours=4))
    assert await listed(created=hours) == [ids[3], ids[2], ids[1]]
    assert await listed(created=hours, keys={"customer_id": "c1"}) == [ids[3], ids[1]]
    assert await listed(created=hours, keys={"customer_id": "c1"}, version=2) == [ids[3], ids[1]]
    assert await listed(created=hours, status=SagaStatus.COMPLETED) == [ids[3], ids[2]]
    assert await listed(
        status=SagaStatus.COMPLETED, keys={"customer_id": "c0"}, name="keyed_order"
    ) == [ids[2]]
    assert await listed(updated=TimeRange(start=T0 + timedelta(hours=12))) == [ids[3], ids[2]]
    assert await listed(updated=TimeRange(end=T0 + timedelta(hours=2))) == [ids[1], ids[0]]
    assert await listed(name="parcel", keys={"customer_id": "c1"}) == []


async def test_pages_neither_repeat_nor_skip_while_sagas_arrive(any_store: SqlSagaStore) -> None:
    clock = Clock()
    client = SagaClient(any_store, REGISTRY, clock=clock)
    before: list[str] = []
    for n in range(8):
        clock.now = T0 + timedelta(seconds=n // 3)  # three at a time share a timestamp
        before.append(await client.start("keyed_order", order(n, "same"), version=1))
    expected = [s.id for s in await client.list(keys={"customer_id": "same"}, limit=100)]
    assert sorted(expected) == sorted(before)

    seen: list[str] = []
    page = await client.page(keys={"customer_id": "same"}, limit=3)
    while True:
        seen.extend(s.id for s in page.sagas)
        # A newer saga arrives between pages: it belongs before the first page.
        clock.now += timedelta(minutes=1)
        await client.start("keyed_order", order(100 + len(seen), "same"), version=1)
        if page.next is None:
            break
        page = await client.page(keys={"customer_id": "same"}, limit=3, after=page.next)
    assert seen == expected  # in order, each once
    assert len(seen) == 8


async def test_prune_removes_the_keys_with_their_sagas(any_store: SqlSagaStore) -> None:
    clock = Clock()
    client = SagaClient(any_store, REGISTRY, clock=clock)
    old = await client.start("keyed_order", order(1), version=1)
    kept = await client.start("keyed_order", order(2), version=1)
    async with any_store.engine.begin() as conn:
        await conn.execute(update(outbox).values(sent_at=T0))
        await conn.execute(update(sagas).where(sagas.c.id == old).values(status="completed"))
    clock.now += timedelta(hours=1)
    assert (await client.prune(timedelta(minutes=1))).rows.sagas == 1
    async with any_store.engine.connect() as conn:
        left = await conn.execute(select(saga_keys.c.saga_id).distinct())
        assert [r.saga_id for r in left] == [kept]
    assert await client.find(order_id="o-1") == []


# -- sagactl ----------------------------------------------------------------------------


@pytest.fixture
def keyed_db(tmp_path: Path) -> tuple[str, list[str]]:
    """A SQLite database holding five sagas of customer c1 and one of c2."""
    url = f"sqlite:///{tmp_path / 'keys.db'}"

    async def fill() -> list[str]:
        engine = create_engine(url)
        await upgrade(engine)
        clock = Clock()
        client = SagaClient(SqlSagaStore(engine), REGISTRY, clock=clock)
        ids = []
        for n in range(6):
            clock.now = T0 + timedelta(minutes=n)
            ids.append(
                await client.start("keyed_order", order(n, "c2" if n == 5 else "c1"), version=1)
            )
        await engine.dispose()
        return ids

    return url, asyncio.run(fill())


def sagactl(url: str, *args: str) -> Result:
    return CliRunner(env={"COLUMNS": "80"}).invoke(
        cli, ["--database-url", url, *args], prog_name="sagactl"
    )


def listed(result: Result) -> list[str]:
    assert result.exit_code == 0, result.output
    return [row["id"] for row in json.loads(result.stdout)]


def test_sagactl_list_by_key_pages_with_after(keyed_db: tuple[str, list[str]]) -> None:
    url, ids = keyed_db
    assert listed(sagactl(url, "--json", "list", "--key", "order_id=o-3")) == [ids[3]]
    both = ("--key", "order_id=o-3", "--key", "customer_id=c2")
    assert listed(sagactl(url, "--json", "list", *both)) == []
    assert "keys customer_id=c1  order_id=o-3\n" in sagactl(url, "show", ids[3]).stdout

    first = sagactl(url, "--json", "list", "--key", "customer_id=c1", "--limit", "2")
    rows = json.loads(first.stdout)
    assert [r["id"] for r in rows] == [ids[4], ids[3]]
    hint = first.stderr.strip()
    assert hint == f"more: --after {rows[-1]['cursor']}"
    assert len(hint) <= 80

    paged = []
    after = rows[-1]["cursor"]
    while True:
        page = sagactl(
            url, "--json", "list", "--key", "customer_id=c1", "--limit", "2", "--after", after
        )
        paged.extend(listed(page))
        if not page.stderr:
            break
        after = page.stderr.strip().removeprefix("more: --after ")
    assert paged == [ids[2], ids[1], ids[0]]

    table = sagactl(url, "list", "--key", "customer_id=c1", "--limit", "2")
    assert table.exit_code == 0, table.output
    assert all(len(line) <= 80 for line in [*table.stdout.splitlines(), table.stderr])

    since = (T0 + timedelta(minutes=4)).isoformat()
    assert listed(sagactl(url, "--json", "list", "--since", since)) == [ids[5], ids[4]]
    until = ("--until", "2026-03-01T12:01:00", "--key", "order_id=o-0")
    assert listed(sagactl(url, "--json", "list", *until)) == [ids[0]]
    assert listed(sagactl(url, "--json", "list", "--since", "1h")) == []  # all in March


def test_sagactl_list_refuses_a_bad_key_or_cursor(keyed_db: tuple[str, list[str]]) -> None:
    url, _ = keyed_db
    for args, message in (
        (["--key", "order_id"], "is not NAME=VALUE"),
        (["--after", "nonsense"], "is not a cursor"),
        (["--since", "yesterday"], "neither an age"),
    ):
        result = sagactl(url, "list", *args)
        assert result.exit_code == 2, result.output
        assert message in result.output
    empty = sagactl(url, "list", "--key", "note=")
    assert empty.exit_code == 1, empty.output
    assert empty.stderr.strip() == "sagactl: error: --key: business key 'note' must not be empty"
