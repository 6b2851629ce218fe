"""engine.timefmt: the ways sagactl and the console show instants and durations."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from engine.timefmt import TimeFormat, duration, iso, parse_instant, relative, utc

NOW = datetime(2026, 11, 30, 12, 0, 0, 250_000, tzinfo=UTC)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.4, "just now"),
        (1, "1s ago"),
        (59.9, "59s ago"),
        (60, "1m ago"),
        (3599, "59m ago"),
        (3600, "1h ago"),
        (47 * 3600 + 3599, "47h ago"),
        (2 * 86400, "2d ago"),
        (400 * 86400, "400d ago"),
        (-20, "in 20s"),
        (-90 * 60, "in 1h"),
    ],
)
def test_relative_is_truncated_to_its_largest_unit(seconds: float, text: str) -> None:
    assert relative(NOW - timedelta(seconds=seconds), NOW) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0ms"),
        (0.3409, "340ms"),
        (1.25, "1.2s"),
        (59.99, "59.9s"),
        (60, "1m"),
        (185, "3m5s"),
        (2 * 3600 + 600 + 59, "2h10m"),
        (3 * 86400 + 4 * 3600 + 59, "3d4h"),
        (-1.5, "-1.5s"),
    ],
)
def test_duration_never_reads_longer_than_it_was(seconds: float, text: str) -> None:
    assert duration(timedelta(seconds=seconds)) == text
    assert duration(seconds) == text


def test_instants_in_utc_whatever_their_zone() -> None:
    paris = NOW.astimezone(timezone(timedelta(hours=1)))
    assert iso(paris) == "2026-11-30T12:00:00Z"
    assert iso(NOW.replace(tzinfo=None)) == "2026-11-30T12:00:00Z"  # naive: UTC
    assert utc(paris) == NOW and utc(paris).tzinfo is UTC
    assert relative(paris, NOW) == "just now"


def test_each_format_of_an_instant_and_a_span() -> None:
    then = NOW - timedelta(minutes=3, seconds=2)
    assert TimeFormat.RELATIVE.instant(then, NOW) == "3m ago"
    assert TimeFormat.ISO.instant(then, NOW) == "2026-11-30T11:56:58Z"
    assert TimeFormat.RAW.instant(then, NOW) == "2026-11-30T11:56:58.250000+00:00"
    assert TimeFormat("iso").instant(None, NOW) == "-"
    assert TimeFormat.RELATIVE.span(timedelta(seconds=1.25)) == "1.2s"
    assert TimeFormat.ISO.span(timedelta(seconds=1.25)) == "1.2s"
    assert TimeFormat.RAW.span(timedelta(seconds=1.25)) == "1.25"
    assert TimeFormat.RAW.span(90) == "90"
    assert TimeFormat.RAW.span(None) == "-"


@pytest.mark.parametrize(
    ("text", "instant"),
    [
        ("2h", NOW - timedelta(hours=2)),
        (" 7d ", NOW - timedelta(days=7)),
        ("2026-11-30T11:00:00Z", datetime(2026, 11, 30, 11, tzinfo=UTC)),
        ("2026-11-30T11:00", datetime(2026, 11, 30, 11, tzinfo=UTC)),  # no zone: UTC
        ("2026-11-30T12:00+01:00", datetime(2026, 11, 30, 11, tzinfo=UTC)),
    ],
)
def test_an_instant_typed_is_an_age_before_now_or_an_iso_time(text: str, instant: datetime) -> None:
    parsed = parse_instant(text, NOW)
    assert parsed == instant and parsed.tzinfo is UTC


@pytest.mark.parametrize("text", ["yesterday", "2h ago", "", "30-11-2026"])
def test_an_instant_that_is_neither_says_so(text: str) -> None:
    with pytest.raises(ValueError, match=r"is neither an age .* nor an ISO 8601 time"):
        parse_instant(text, NOW)
