"""Copy-on-write edits of an event in wire form, for the sink transforms (shared/transforms.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Path = tuple[str, ...]


class WireWriter:
    """Copy-on-write access to a wire dict: the router's event is shared by every sink, never mutated."""

    def __init__(self, wire: dict[str, Any]) -> None:
        self.root = dict(wire)
        self.owned = {id(self.root)}

    def parent(self, path: Path, create: bool) -> dict[str, Any] | None:
        node = self.root
        for name in path[:-1]:
            child = node.get(name)
            if not isinstance(child, dict):
                if not create:
                    return None
                child = {}
            if id(child) not in self.owned:
                child = dict(child)
                self.owned.add(id(child))
            node[name] = child
            node = child
        return node

    def get(self, path: Path) -> tuple[bool, Any]:
        node: Any = self.root
        for name in path:
            if not isinstance(node, dict) or name not in node:
                return False, None
            node = node[name]
        return True, node

    def pop(self, path: Path) -> tuple[bool, Any]:
        found, _ = self.get(path)
        if not found:
            return False, None
        parent = self.parent(path, create=False)
        assert parent is not None
        return True, parent.pop(path[-1])

    def put(self, path: Path, value: Any) -> None:
        parent = self.parent(path, create=True)
        assert parent is not None
        parent[path[-1]] = value


DROP = object()  # what a leaf function returns to remove the field


def rewrite(w: WireWriter, node: Any, path: Path, leaf: Callable[[Any], Any]) -> Any:
    """`node` with the field at `path` replaced by leaf(value) (or removed on DROP), copied on write.

    A list met on the way is walked: the rest of the path applies to each of its elements (maps), so
    payload.user.email reaches every user of `payload.user: [{email: ...}, ...]`. Unchanged: `node` itself.
    """
    if isinstance(node, list):
        items = [rewrite(w, item, path, leaf) for item in node]
        return node if all(a is b for a, b in zip(items, node, strict=True)) else items
    if not isinstance(node, dict) or path[0] not in node:
        return node
    value = node[path[0]]
    new = leaf(value) if len(path) == 1 else rewrite(w, value, path[1:], leaf)
    if new is value:
        return node
    if id(node) not in w.owned:
        node = dict(node)
        w.owned.add(id(node))
    if new is DROP:
        del node[path[0]]
    else:
        node[path[0]] = new
    return node


def apply_at(w: WireWriter, path: Path, leaf: Callable[[Any], Any]) -> None:
    w.root = rewrite(w, w.root, path, leaf)
