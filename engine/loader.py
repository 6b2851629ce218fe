"""Application code named by module path (``SAGA_WORKERS``, ``sagactl worker``, the
demo's example), imported by name at run time: the library never imports an
application's modules, nor its own example, itself."""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from engine.errors import ConfigError
from engine.worker.worker import Worker


def import_object(path: str, what: str) -> object:
    """The object at ``package.module:attribute``; a one-line ConfigError naming
    ``what`` was wanted when the path is malformed, its module does not import, or it
    has no such attribute."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"{what} {path!r} is not a module:object path")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {what} module {module_name!r}: {exc}") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ConfigError(f"module {module_name!r} has no {what} {attribute!r}") from None


def load_worker(spec: str, known: Sequence[str] = ()) -> Worker:
    """The worker at ``module:object``, or the one named ``spec`` among the workers at
    the paths ``known`` (``SAGA_WORKERS``), imported in turn until it is found."""
    if ":" in spec:
        return _worker_at(spec)
    for path in known:
        worker = _worker_at(path)
        if worker.name == spec:
            return worker
    listed = f"SAGA_WORKERS lists {', '.join(known)}" if known else "SAGA_WORKERS is empty"
    raise ConfigError(f"unknown worker {spec!r}: give module:object ({listed})")


def _worker_at(path: str) -> Worker:
    worker = import_object(path, "worker")
    if not isinstance(worker, Worker):
        raise ConfigError(f"{path!r} is not a saga-engine Worker")
    return worker
