"""Every name a deployment gives to what it keeps in a shared Redis or RabbitMQ,
derived from its namespace (RESULTITY_NAMESPACE, or --namespace): keys and pub/sub
channels in ``RedisNames``, exchanges and queues in ``AmqpNames``. Adapters take
their names from here and make up none of their own.

Two deployments on one Redis or one broker (staging beside production, two test
runs on one machine) keep apart when their namespaces differ: neither reads the
other's presence, counters, sessions or invalidations, nor consumes its
settlements or ledger events. A namespace holds neither separator (':' in Redis,
'.' in RabbitMQ), so each name is its namespace, a separator and the rest: no
name of one namespace is a name of another.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from core.errors import InvalidArgument

# The names deployments had before namespaces: a deployment that sets none keeps them.
DEFAULT_NAMESPACE = "resultity"
MAX_NAMESPACE_LENGTH = 32
_NAMESPACE = re.compile(r"[a-z0-9][a-z0-9_-]*")


def validate_namespace(namespace: str) -> str:
    """``namespace`` if it is one: 1 to 32 lowercase letters, digits, '-' or '_',
    starting with a letter or a digit."""
    if len(namespace) > MAX_NAMESPACE_LENGTH or not _NAMESPACE.fullmatch(namespace):
        raise InvalidArgument(
            f"namespace must be 1-{MAX_NAMESPACE_LENGTH} lowercase letters, digits, '-' or"
            f" '_', starting with a letter or digit, e.g. 'staging' (got {namespace[:40]!r})",
            field="namespace",
        )
    return namespace


@dataclass(frozen=True, slots=True)
class RedisNames:
    """The keys and channels of one namespace in Redis."""

    namespace: str = DEFAULT_NAMESPACE

    def __post_init__(self) -> None:
        validate_namespace(self.namespace)

    def _name(self, *parts: str) -> str:
        return ":".join((self.namespace, *parts))

    @property
    def invalidations(self) -> str:
        """The channel revoked keys and changed accounts are announced on."""
        return self._name("invalidations")

    def network_channel(self, network_id: str, topic: str) -> str:
        """The channel a network's replicas announce ``topic`` changes on."""
        return self._name("network", network_id, topic)

    @property
    def presence_index(self) -> str:
        """The sorted set of present node ids, scored by their records' expiry."""
        return self._name("presence", "nodes")

    def presence_record(self, node_id: str) -> str:
        return self._name("presence", "node", node_id)

    @property
    def presence_changes(self) -> str:
        """The change log: node ids scored by the sequence of their latest change."""
        return self._name("presence", "changes")

    @property
    def presence_log(self) -> str:
        """The change log's state: epoch, sequence and trimmed floor."""
        return self._name("presence", "log")

    @property
    def presence_leases(self) -> str:
        """Each network replica's latest lease."""
        return self._name("presence", "leases")

    @property
    def presence_sessions(self) -> str:
        """Per present node, the session its record holds: expiry, connected_at,
        content digest and replica id (presence_redis.py)."""
        return self._name("presence", "sessions")

    def rate_bucket(self, scope: str) -> str:
        """A rate-limit scope's (a key's, an account's) request and token buckets."""
        return self._name("rate", scope)

    def rate_in_flight(self, scope: str) -> str:
        """A rate-limit scope's running requests, scored by their leases' expiry."""
        return self._name("rate", scope, "flight")

    def console_session(self, handle: str) -> str:
        return self._name("console", "session", handle)


@dataclass(frozen=True, slots=True)
class AmqpNames:
    """The exchanges and queues of one namespace in RabbitMQ."""

    namespace: str = DEFAULT_NAMESPACE

    def __post_init__(self) -> None:
        validate_namespace(self.namespace)

    def _name(self, *parts: str) -> str:
        return ".".join((self.namespace, *parts))

    @property
    def settlements(self) -> str:
        """The queue of deferred settlements (cloud publishes, account applies)."""
        return self._name("settlements")

    @property
    def ledger_exchange(self) -> str:
        """The topic exchange ledger events are published to, by kind."""
        return self._name("ledger")

    def ledger_queue(self, consumer: str) -> str:
        """The durable queue of a ledger event consumer (e.g. 'consumer-usage')."""
        return self._name("ledger", consumer)

    @staticmethod
    def dead_letter(queue: str) -> str:
        """The exchange, and its queue, where ``queue``'s refused messages are kept."""
        return f"{queue}.dead"
