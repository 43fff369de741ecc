"""What a node advertises of its cache, kept in step with the router's index.

A node, a local session or one another replica owns, advertises the
fingerprints of the conversations its cache holds (core/prompt_prefixes.py).
The router indexes the nodes by fingerprint (node_index.py) so that a chat's
next turn finds the node holding its start in a fleet of any size. A node's
fingerprints change only through ``cached_prefixes``' setter, which tells each
index holding the node: whoever changes them, no index can fall behind.
"""

from __future__ import annotations

from collections.abc import Callable

# Called with the node's old and new fingerprints after they changed.
PrefixListener = Callable[[frozenset[int], frozenset[int]], None]


class AdvertisesPrefixes:
    """The ``cached_prefixes`` of a node class, which declares ``_advertised``
    (the fingerprints) and ``prefix_listeners`` (one per index holding the
    node) as fields."""

    __slots__ = ()
    _advertised: frozenset[int]
    prefix_listeners: list[PrefixListener]

    @property
    def cached_prefixes(self) -> frozenset[int]:
        return self._advertised

    @cached_prefixes.setter
    def cached_prefixes(self, prefixes: frozenset[int]) -> None:
        # The node classes declare the slot; mypy looks for it here.
        old, self._advertised = self._advertised, frozenset(prefixes)  # type: ignore[misc]
        if old != self._advertised:
            for listener in self.prefix_listeners:
                listener(old, self._advertised)
