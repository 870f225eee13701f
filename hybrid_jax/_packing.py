"""A state's small leaves packed into one buffer per dtype, so that a call moves few arrays.

Stepped from Python, a program's host cost grows with the number of arrays it takes and
returns: each one is a buffer to look up, alias or create and a Python object, a few
microseconds apiece on a GPU. A ``HybridState`` has a hundred or more leaves, almost all
of them scalars and small vectors (counters, statistics, the phase machine, the
monitor, the RSSM's weights), and on a small model they, not the model, set the step's
cost. ``StateLayout`` packs every leaf of at most ``SMALL`` elements into one flat
buffer per dtype and keeps the larger ones (parameter-shaped leaves: the basis, the
snapshot, the inner optimizer's moments) as they are. Inside a compiled program packing
and unpacking are a concatenation and static slices of a few kilobytes.

A ``PackedState`` is a pytree (its layout is static), so programs take and donate it
like any state. Its attributes read through to the state it holds (``packed.step``,
``packed.counters.rollbacks``: one small device call, cached), and ``unpacked()``
returns the ``HybridState`` itself, for checkpoints and ``jax.tree`` functions.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

SMALL = 1 << 16  # elements: leaves of at most this size are packed


class _Slot(NamedTuple):
    """Where one leaf lives: a kept (big) leaf's index, or a packed leaf's buffer and span."""

    packed: bool
    index: int  # kept: position among the kept leaves; packed: its buffer's position
    start: int
    shape: tuple[int, ...]


class StateLayout:
    """How a pytree of arrays is split into kept leaves and packed buffers (one per
    dtype), worked out once from its leaves' shapes and dtypes (``like``: the tree or
    its ``eval_shape``). Hashable: two trees of the same structure, shapes and dtypes
    have equal layouts."""

    def __init__(self, like: PyTree, small: int = SMALL):
        leaves, self.treedef = jax.tree.flatten(like)
        dtypes: list[np.dtype] = []
        sizes: list[int] = []
        slots, kept = [], 0
        for leaf in leaves:
            shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
            size = int(np.prod(shape, dtype=np.int64))
            if size > small or jnp.issubdtype(dtype, jax.dtypes.extended):
                slots.append(_Slot(packed=False, index=kept, start=0, shape=shape))
                kept += 1
                continue
            if dtype not in dtypes:
                dtypes.append(dtype)
                sizes.append(0)
            g = dtypes.index(dtype)
            slots.append(_Slot(packed=True, index=g, start=sizes[g], shape=shape))
            sizes[g] += size
        self.slots, self.dtypes, self.sizes = tuple(slots), tuple(dtypes), tuple(sizes)
        self.kept = kept
        self._key = (self.treedef, self.slots, self.dtypes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StateLayout) and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    @property
    def arrays(self) -> int:
        """Arrays a packed tree is made of (kept leaves and buffers)."""
        return self.kept + len(self.dtypes)

    def pack(self, tree: PyTree) -> PackedState:
        """``tree`` (of this layout) as a ``PackedState``; traceable. Its kept leaves are
        the very arrays of ``tree``."""
        leaves = self.treedef.flatten_up_to(tree)
        kept = [x for x, s in zip(leaves, self.slots, strict=True) if not s.packed]
        parts: list[list[Any]] = [[] for _ in self.dtypes]
        for x, s in zip(leaves, self.slots, strict=True):
            if s.packed:
                parts[s.index].append(jnp.ravel(jnp.asarray(x, self.dtypes[s.index])))
        buffers = [jnp.concatenate(p) if len(p) > 1 else p[0] for p in parts]
        return PackedState(self, tuple(kept), tuple(buffers))

    def unpack(self, packed: PackedState) -> PyTree:
        """The tree a ``PackedState`` holds; traceable (slices of its buffers)."""
        self._check(packed)
        leaves = []
        for s in self.slots:
            if not s.packed:
                leaves.append(packed.kept[s.index])
                continue
            size = int(np.prod(s.shape, dtype=np.int64))
            buf = packed.buffers[s.index]
            part = (
                buf if size == buf.shape[0] else jax.lax.slice(buf, (s.start,), (s.start + size,))
            )
            leaves.append(part.reshape(s.shape))
        return jax.tree.unflatten(self.treedef, leaves)

    def _check(self, packed: Any) -> None:
        if not isinstance(packed, PackedState) or packed.layout != self:
            got = packed.layout if isinstance(packed, PackedState) else type(packed).__name__
            raise TypeError(
                f"hybrid_jax: expected a PackedState of this layout; got {got!s:.200}. "
                "A packed state belongs to the step that made it; pass state.unpacked() "
                "to another step"
            )

    def __repr__(self) -> str:
        groups = ", ".join(f"{d}[{n}]" for d, n in zip(self.dtypes, self.sizes, strict=True))
        return f"StateLayout({self.kept} kept leaves; packed: {groups})"


@functools.cache
def _pack_small(layout: StateLayout):
    """Jitted: the packed leaves (in order) -> the buffers."""

    def pack(small: list[Any]) -> tuple:
        it = iter(small)
        leaves = [next(it) if s.packed else jnp.zeros((), jnp.int8) for s in layout.slots]
        return layout.pack(jax.tree.unflatten(layout.treedef, leaves)).buffers

    return jax.jit(pack)


@functools.cache
def _unpack_small(layout: StateLayout):
    """Jitted: the buffers -> the packed leaves (in order)."""

    def unpack(buffers: tuple) -> list[Any]:
        kept = tuple(jnp.zeros((), jnp.int8) for _ in range(layout.kept))
        tree = layout.unpack(PackedState(layout, kept, buffers))
        leaves = layout.treedef.flatten_up_to(tree)
        return [x for x, s in zip(leaves, layout.slots, strict=True) if s.packed]

    return jax.jit(unpack)


@jax.tree_util.register_pytree_node_class
class PackedState:
    """A state whose small leaves are packed by dtype (see the module). Made by a step
    built with ``pack_state=True``; pass it back to that step as its state."""

    __slots__ = ("_cache", "buffers", "kept", "layout")

    def __init__(self, layout: StateLayout, kept: tuple, buffers: tuple):
        self.layout, self.kept, self.buffers = layout, kept, buffers
        self._cache: Any = None

    def tree_flatten(self):
        return (self.kept, self.buffers), self.layout

    @classmethod
    def tree_unflatten(cls, layout: StateLayout, children: Any) -> PackedState:
        return cls(layout, tuple(children[0]), tuple(children[1]))

    def unpacked(self) -> Any:
        """The state this holds (its own tree of arrays; kept leaves are shared)."""
        if self._cache is None:
            layout = self.layout
            small = iter(_unpack_small(layout)(self.buffers))
            kept = iter(self.kept)
            leaves = [next(small) if s.packed else next(kept) for s in layout.slots]
            self._cache = jax.tree.unflatten(layout.treedef, leaves)
        return self._cache

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.unpacked(), name)

    def __repr__(self) -> str:
        return f"PackedState({self.layout!r})"


def packed(state: Any, layout: StateLayout | None = None) -> PackedState:
    """``state`` packed (on the host: one small device call), or as it is if packed."""
    if isinstance(state, PackedState):
        return state
    layout = layout or StateLayout(state)
    leaves = layout.treedef.flatten_up_to(state)
    kept = tuple(x for x, s in zip(leaves, layout.slots, strict=True) if not s.packed)
    small = [x for x, s in zip(leaves, layout.slots, strict=True) if s.packed]
    return PackedState(layout, kept, tuple(_pack_small(layout)(small)))


def unpack_state(state: Any) -> Any:
    """The tree a ``PackedState`` holds; any other state as it is."""
    return state.unpacked() if isinstance(state, PackedState) else state
