"""Destination names on the broker, derived from one configurable prefix."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topology:
    """The names of topics, queues and consumer groups, all under one prefix
    (``SAGA_TOPIC_PREFIX``), so deployments sharing a broker never see each other."""

    prefix: str = "saga"

    def commands(self, participant: str) -> str:
        """Commands and compensations for one participant."""
        return f"{self.prefix}.commands.{participant}"

    @property
    def replies(self) -> str:
        """Replies from every participant back to the engine."""
        return f"{self.prefix}.replies"

    @property
    def dead_letters(self) -> str:
        """Messages no consumer could take, with the reason; the engine archives them."""
        return f"{self.prefix}.dead-letters"

    def group(self, name: str) -> str:
        """A consumer group of this deployment. Kafka groups span topics, so a group
        shared by two prefixes would stall one deployment's consumers whenever the
        other's rebalance (e.g. a crashed member's session running out)."""
        return f"{self.prefix}.{name}"


def participant_of(destination: str) -> str | None:
    """The participant a command destination is named for (``<prefix>.commands.<name>``,
    whatever the prefix: a row may come from a process with another); None for any
    other destination."""
    _, commands, name = destination.rpartition(".commands.")
    return name if commands and name else None
