from __future__ import annotations

import random
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from engine.definition import (
    DEFAULT_COMPENSATION_RETRY,
    Compensation,
    RetryPolicy,
    Saga,
    Step,
    StepContext,
    build_payload,
)
from engine.errors import DefinitionError, InvalidInputError


class Inp(BaseModel):
    n: int = Field(gt=0)
    who: str


class Nested(BaseModel):
    inner: Inp


def cmd(ctx: StepContext) -> dict[str, Any]:
    return {"id": ctx.saga_id}


def step(name: str, *, compensated: bool = True, **kwargs: Any) -> Step:
    comp = Compensation(f"undo_{name}", cmd) if compensated else None
    return Step(name=name, participant="p", command=cmd, compensation=comp, **kwargs)


def saga(*steps: Step, name: str = "s", input: Any = Inp, version: int = 1) -> Saga:
    return Saga(name=name, version=version, input=input, steps=list(steps))


# -- validation --------------------------------------------------------------------


def test_valid_saga_indexes_steps_by_name() -> None:
    s = saga(step("a"), step("b"), step("c", compensated=False))
    assert s.key == ("s", 1)
    assert [x.name for x in s.steps] == ["a", "b", "c"]
    assert isinstance(s.steps, tuple)
    assert s.step("b").name == "b"
    assert s.position("c") == 2
    assert s.step("c").is_pivot and not s.step("a").is_pivot


def test_duplicate_step_names_are_rejected() -> None:
    with pytest.raises(DefinitionError, match=r"saga 's': duplicate step name 'a'"):
        saga(step("a"), step("b"), step("a"))


def test_two_steps_with_one_command_name_are_rejected_naming_both() -> None:
    with pytest.raises(DefinitionError) as info:
        saga(step("a", command_name="reserve"), step("b"), step("c", command_name="reserve"))
    assert str(info.value) == (
        "saga 's': step 'c' and step 'a' both use the command name 'reserve'; give each its own"
    )


def test_a_step_named_like_another_steps_command_is_rejected() -> None:
    with pytest.raises(DefinitionError, match=r"step 'b' and step 'a' both use .* 'b'"):
        saga(step("a", command_name="b"), step("b"))


def test_a_compensation_named_like_a_command_is_rejected_naming_both() -> None:
    undo_b = Compensation("b", cmd)
    with pytest.raises(DefinitionError) as info:
        saga(Step(name="a", participant="p", command=cmd, compensation=undo_b), step("b"))
    assert "step 'b' and compensation of step 'a' both use the command name 'b'" in str(info.value)
    own = Compensation("a", cmd)
    with pytest.raises(DefinitionError, match=r"compensation of step 'a' and step 'a'"):
        saga(Step(name="a", participant="p", command=cmd, compensation=own))


def test_two_compensations_with_one_name_are_rejected() -> None:
    undo = Compensation("undo", cmd)
    a = Step(name="a", participant="p", command=cmd, compensation=undo)
    b = Step(name="b", participant="q", command=cmd, compensation=undo)
    with pytest.raises(DefinitionError, match=r"compensation of step 'b' and compensation of"):
        saga(a, b)


def test_compensation_after_pivot_is_rejected_naming_both_steps() -> None:
    with pytest.raises(DefinitionError) as info:
        saga(step("a"), step("pay", compensated=False), step("ship"))
    message = str(info.value)
    assert "step 'ship'" in message
    assert "pivot step 'pay'" in message
    assert "can never be undone" in message


def test_steps_after_the_pivot_without_compensation_are_fine() -> None:
    s = saga(step("a"), step("pay", compensated=False), step("notify", compensated=False))
    assert [x.is_pivot for x in s.steps] == [False, True, True]


@pytest.mark.parametrize("bad", ["Order", "1order", "order saga", "", "ordér", "_x"])
def test_bad_saga_names(bad: str) -> None:
    with pytest.raises(DefinitionError, match="must be lowercase letters"):
        saga(step("a"), name=bad)


def test_bad_step_name() -> None:
    with pytest.raises(DefinitionError, match=r"step 'Bad Step': name must be lowercase"):
        saga(step("Bad Step"))


def test_bad_participant_name() -> None:
    bad = Step(name="a", participant="Pay Service", command=cmd)
    with pytest.raises(DefinitionError, match=r"participant 'Pay Service' is not a name"):
        saga(bad)


def test_bad_compensation_name() -> None:
    bad = Step(name="a", participant="p", command=cmd, compensation=Compensation("Undo!", cmd))
    with pytest.raises(DefinitionError, match=r"step 'a': compensation name is not a name"):
        saga(bad)


def test_command_must_be_callable() -> None:
    bad = Step(name="a", participant="p", command="not callable")  # type: ignore[arg-type]
    with pytest.raises(DefinitionError, match="command must be a callable"):
        saga(bad)


def test_compensation_builder_must_be_callable() -> None:
    bad = Step(
        name="a",
        participant="p",
        command=cmd,
        compensation=Compensation("undo", 42),  # type: ignore[arg-type]
    )
    with pytest.raises(DefinitionError, match=r"compensation\.build must be callable"):
        saga(bad)


@pytest.mark.parametrize("timeout", [timedelta(0), timedelta(seconds=-1)])
def test_non_positive_timeout(timeout: timedelta) -> None:
    with pytest.raises(DefinitionError, match=r"step 'a': timeout must be positive"):
        saga(step("a", timeout=timeout))


@pytest.mark.parametrize("bad_input", [dict, Inp(n=1, who="x"), "Inp", int])
def test_input_must_be_a_pydantic_model_class(bad_input: Any) -> None:
    with pytest.raises(DefinitionError, match="input must be a pydantic model class"):
        saga(step("a"), input=bad_input)


def test_no_steps() -> None:
    with pytest.raises(DefinitionError, match="needs at least one step"):
        saga()


def test_version_must_be_positive() -> None:
    with pytest.raises(DefinitionError, match="version must be at least 1"):
        saga(step("a"), version=0)


def test_steps_must_be_step_objects() -> None:
    with pytest.raises(DefinitionError, match="steps must be Step objects"):
        Saga(name="s", version=1, input=Inp, steps=[{"name": "a"}])  # type: ignore[list-item]


def test_unknown_step_lookup_names_saga_and_version() -> None:
    s = saga(step("a"), version=3)
    with pytest.raises(DefinitionError, match=r"saga 's' v3 has no step 'zz'"):
        s.step("zz")


def test_action_name_defaults_to_step_name() -> None:
    assert step("a").action_name == "a"
    assert Step(name="a", participant="p", command=cmd, command_name="do_a").action_name == "do_a"


def test_compensations_default_to_the_patient_policy() -> None:
    assert step("a").compensation_retry is DEFAULT_COMPENSATION_RETRY
    assert DEFAULT_COMPENSATION_RETRY.max_attempts > RetryPolicy().max_attempts


# -- retry policy ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_attempts": 0}, "max_attempts must be at least 1"),
        ({"initial_backoff": -0.1}, "initial_backoff <= max_backoff"),
        ({"initial_backoff": 5, "max_backoff": 1}, "initial_backoff <= max_backoff"),
        ({"multiplier": 0.5}, "multiplier must be at least 1"),
        ({"jitter": 1.5}, "jitter must be between 0 and 1"),
        ({"jitter": -0.1}, "jitter must be between 0 and 1"),
    ],
)
def test_retry_policy_validation(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(DefinitionError, match=message):
        RetryPolicy(**kwargs)


def test_delay_grows_exponentially_without_jitter() -> None:
    policy = RetryPolicy(initial_backoff=0.1, multiplier=3, max_backoff=100, jitter=0)
    assert [policy.delay(a) for a in (1, 2, 3, 4)] == pytest.approx([0.1, 0.3, 0.9, 2.7])


def test_delay_is_capped_by_max_backoff() -> None:
    policy = RetryPolicy(initial_backoff=1, multiplier=2, max_backoff=5, jitter=0)
    assert [policy.delay(a) for a in range(1, 7)] == pytest.approx([1, 2, 4, 5, 5, 5])
    assert policy.delay(200) == 5  # no overflow for huge attempt numbers


@settings(max_examples=60, deadline=None)
@given(
    attempt=st.integers(min_value=1, max_value=40),
    jitter=st.floats(min_value=0, max_value=1),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_jitter_only_lowers_the_delay_and_stays_within_the_fraction(
    attempt: int, jitter: float, seed: int
) -> None:
    policy = RetryPolicy(initial_backoff=0.2, multiplier=2, max_backoff=30, jitter=jitter)
    base = RetryPolicy(initial_backoff=0.2, multiplier=2, max_backoff=30, jitter=0).delay(attempt)
    delay = policy.delay(attempt, random.Random(seed))
    assert delay <= base
    assert delay >= base * (1 - jitter) - 1e-12


def test_jitter_spreads_delays_with_a_seeded_rng() -> None:
    policy = RetryPolicy(initial_backoff=1, max_backoff=1, jitter=0.5)
    rng = random.Random(7)
    delays = {round(policy.delay(1, rng), 6) for _ in range(20)}
    assert len(delays) > 10
    assert all(0.5 <= d <= 1 for d in delays)
    again = random.Random(7)
    assert policy.delay(1, again) == pytest.approx(policy.delay(1, random.Random(7)))


# -- input -------------------------------------------------------------------------


def test_parse_input_returns_a_model() -> None:
    parsed = saga(step("a")).parse_input({"n": 3, "who": "x"})
    assert parsed == Inp(n=3, who="x")


def test_parse_input_passes_an_instance_through() -> None:
    value = Inp(n=1, who="y")
    assert saga(step("a")).parse_input(value) is value


def test_parse_input_error_names_the_bad_field() -> None:
    with pytest.raises(InvalidInputError) as info:
        saga(step("a")).parse_input({"n": 0, "who": "x"})
    message = str(info.value)
    assert message.startswith("invalid input for saga 's': n: ")
    assert "greater than 0" in message
    assert "who" not in message


def test_parse_input_error_lists_every_bad_field_with_its_path() -> None:
    s = saga(step("a"), input=Nested)
    with pytest.raises(InvalidInputError) as info:
        s.parse_input({"inner": {"n": "many"}})
    message = str(info.value)
    assert "inner.n: " in message
    assert "inner.who: Field required" in message


def test_parse_input_of_a_non_mapping() -> None:
    with pytest.raises(InvalidInputError, match=r"saga 's': input: "):
        saga(step("a")).parse_input(["not", "a", "dict"])


def test_build_payload_accepts_models_and_mappings() -> None:
    ctx = StepContext(saga_id="s1", input=Inp(n=1, who="x"), replies={})
    assert build_payload(cmd, ctx) == {"id": "s1"}
    assert build_payload(lambda c: Inp(n=2, who=c.saga_id), ctx) == {"n": 2, "who": "s1"}


# -- shape and fingerprint ---------------------------------------------------------------


def test_shape_describes_each_step_structurally() -> None:
    s = saga(step("a"), step("b", compensated=False, command_name="do_b"))
    assert s.shape() == [
        {
            "kind": "step",
            "name": "a",
            "participant": "p",
            "command": "a",
            "compensation": "undo_a",
            "pivot": False,
        },
        {
            "kind": "step",
            "name": "b",
            "participant": "p",
            "command": "do_b",
            "compensation": None,
            "pivot": True,
        },
    ]


def test_the_fingerprint_changes_with_the_structure_only() -> None:
    base = saga(step("a"), step("b"))
    assert len(base.fingerprint) == 16 and int(base.fingerprint, 16) >= 0
    # Timeouts, retries, builders and the version do not change it...
    same = saga(
        step("a", timeout=timedelta(seconds=3), retry=RetryPolicy(max_attempts=9)),
        step("b"),
        version=2,
    )
    assert same.fingerprint == base.fingerprint
    # ...a step added, removed, renamed, moved or re-routed does.
    changed = [
        saga(step("a"), step("b"), step("c")),
        saga(step("a")),
        saga(step("a"), step("b2")),
        saga(step("b"), step("a")),
        saga(step("a"), replace(step("b"), participant="q")),
        saga(step("a"), step("b", compensated=False)),
    ]
    prints = {base.fingerprint, *(c.fingerprint for c in changed)}
    assert len(prints) == len(changed) + 1
