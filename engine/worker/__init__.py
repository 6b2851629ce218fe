"""The participant side: worker definitions, the barrier and the runner."""

from engine.worker.runner import WorkerRunner
from engine.worker.worker import HandlerContext, Worker

__all__ = ["HandlerContext", "Worker", "WorkerRunner"]
