"""One registry type for everything selectable by name: methods, streams, scorers, backbone presets,
evaluation protocols. Built-ins and plugins (``mmcl run --plugin``, the ``mmcl.plugins`` entry points)
register the same way; a second, different entry under a taken name is refused with a clear error."""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

from mmcl.errors import ConfigError

T = TypeVar("T")


def origin_of(item: object) -> str:
    """Where ``item`` was defined (``module.qualname``): what a duplicate-name error shows."""
    target = item if hasattr(item, "__qualname__") else type(item)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', '?')}"


class Registry(Mapping[str, T], Generic[T]):
    """Name -> item, read like a mapping; :meth:`register` refuses a duplicate name.

    Registering the very same definition again (a module imported twice, e.g. a plugin loaded again on
    resume) is a no-op; a different definition under a taken name is a :class:`ConfigError`."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._origins: dict[str, str] = {}

    def register(self, name: str, item: T, origin: str | None = None) -> T:
        origin = origin or origin_of(item)
        if name in self._items and self._origins[name] != origin:
            raise ConfigError(
                f"{self.kind} {name!r} is already registered by {self._origins[name]}; "
                f"{origin} must use another name"
            )
        self._items[name] = item
        self._origins[name] = origin
        return item

    def lookup(self, name: str, key: str) -> T:
        """The item registered as ``name``; a :class:`ConfigError` naming the config ``key`` otherwise."""
        if name in self._items:
            return self._items[name]
        close = difflib.get_close_matches(name, list(self._items), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{key}: unknown {self.kind} {name!r}{hint} (known: {', '.join(sorted(self._items))})")

    def unregister(self, name: str) -> None:
        """Forget ``name`` (tests that register a throw-away entry)."""
        self._items.pop(name, None)
        self._origins.pop(name, None)

    def origin(self, name: str) -> str:
        return self._origins[name]

    def __getitem__(self, name: str) -> T:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self._items)})"
