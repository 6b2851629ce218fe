"""Workers named by module path or, through SAGA_WORKERS, by participant name."""

from __future__ import annotations

import pytest

from engine.errors import ConfigError
from engine.loader import import_object, load_worker
from workers import inventory, payment
from workers.demo import WORKERS


def test_a_worker_by_path_or_by_its_name_among_the_listed() -> None:
    assert load_worker("workers.payment:worker") is payment.worker
    assert load_worker("inventory", WORKERS) is inventory.worker
    with pytest.raises(ConfigError, match=r"unknown worker 'billing'.*SAGA_WORKERS lists"):
        load_worker("billing", WORKERS)
    with pytest.raises(ConfigError, match=r"unknown worker 'inventory'.*SAGA_WORKERS is empty"):
        load_worker("inventory")


def test_malformed_or_missing_paths_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match=r"'workers\.payment' is not a module:object path"):
        import_object("workers.payment", "worker")
    with pytest.raises(ConfigError, match=r"module 'workers\.payment' has no worker 'nope'"):
        import_object("workers.payment:nope", "worker")
    with pytest.raises(ConfigError, match=r"'engine:Engine' is not a saga-engine Worker"):
        load_worker("engine:Engine")
