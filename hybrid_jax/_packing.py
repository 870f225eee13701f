"""A state's small leaves packed into one buffer per dtype, so that a call moves few arrays.

Stepped from Python, a program's host cost grows with the number of arrays it takes and
returns: each one is a buffer to look up, alias or create and a Python object, a few
microseconds apiece on a GPU. A ``HybridState`` has a hundred or more leaves, almost all
of them scalars and small vectors (counters, statistics, the phase machine, the
monitor, the RSSM's weights), and on a small model they, not the model, set the step's
cost. ``StateLayout`` packs every leaf of at most ``SMALL`` elements into one flat
buffer per dtype and keeps the others as they are: parameter-shaped leaves (the basis,
the snapshot, the inner optimizer's moments), typed PRNG keys, and leaves sharded over
several devices (packing would lose their sharding). Inside a compiled program packing
and unpacking are a concatenation and static slices (tens of kilobytes; about a
megabyte with the RSSM's weights). Weak types are not kept (``tx.init`` makes none).

A ``PackedState`` is a pytree (its layout is static), so programs take and donate it
like any state. Its fields read through to the state it holds (``packed.step``,
``packed.counters.rollbacks``: one small device call per read, for that field's small
leaves only), and ``unpacked()`` returns the ``HybridState`` itself, for checkpoints,
``_replace`` and ``jax.tree`` functions; a step given that state packs it again.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

SMALL = 1 << 16  # elements: leaves of at most this size are packed


class _Slot(NamedTuple):
    """Where one leaf lives: a kept leaf's index, or a packed leaf's buffer and span."""

    packed: bool
    index: int  # kept: position among the kept leaves; packed: its buffer's position
    start: int
    shape: tuple[int, ...]
    dtype: Any


def _packable(leaf: Any, dtype: Any, size: int, small: int) -> bool:
    if size > small or jax.dtypes.issubdtype(dtype, jax.dtypes.extended):
        return False
    try:
        sharding = getattr(leaf, "sharding", None)
    except Exception:  # an abstract value without one
        sharding = None
    return sharding is None or len(sharding.device_set) <= 1


class StateLayout:
    """How a pytree of arrays is split into kept leaves and packed buffers (one per
    dtype), worked out once from its leaves' shapes, dtypes and shardings (``like``: the
    tree or its ``eval_shape``). Hashable: trees of the same structure, shapes and
    dtypes have equal layouts."""

    def __init__(self, like: PyTree, small: int = SMALL):
        with_paths, self.treedef = jax.tree_util.tree_flatten_with_path(like)
        self.paths = tuple(jax.tree_util.keystr(p) for p, _ in with_paths)
        self.index_tree = jax.tree.unflatten(self.treedef, range(len(with_paths)))
        dtypes: list[Any] = []
        sizes: list[int] = []
        slots, kept = [], 0
        for _, leaf in with_paths:
            shape, dtype = tuple(np.shape(leaf)), jnp.result_type(leaf)
            size = int(np.prod(shape, dtype=np.int64))
            if not _packable(leaf, dtype, size, small):
                slots.append(_Slot(packed=False, index=kept, start=0, shape=shape, dtype=dtype))
                kept += 1
                continue
            if dtype not in dtypes:
                dtypes.append(dtype)
                sizes.append(0)
            g = dtypes.index(dtype)
            slots.append(_Slot(packed=True, index=g, start=sizes[g], shape=shape, dtype=dtype))
            sizes[g] += size
        self.slots, self.dtypes, self.sizes = tuple(slots), tuple(dtypes), tuple(sizes)
        self.kept = kept
        self._key = (self.treedef, self.slots)
        self._hash = hash(self._key)

    def __eq__(self, other: object) -> bool:  # on every call of a program (its pytree's aux)
        if other is self:
            return True
        if not isinstance(other, StateLayout) or self._hash != other._hash:
            return False
        return self._key == other._key

    def __hash__(self) -> int:
        return self._hash

    @property
    def arrays(self) -> int:
        """Arrays a packed tree is made of (kept leaves and buffers)."""
        return self.kept + len(self.dtypes)

    def pack(self, tree: PyTree) -> PackedState:
        """``tree`` (of this layout: a ``TypeError`` names the first leaf whose shape or
        dtype differs) as a ``PackedState``; traceable. Its kept leaves are the very
        arrays of ``tree``."""
        leaves = self.treedef.flatten_up_to(tree)
        parts: list[list[Any]] = [[] for _ in self.dtypes]
        kept = []
        for x, s, path in zip(leaves, self.slots, self.paths, strict=True):
            if (np.shape(x), jnp.result_type(x)) != (s.shape, s.dtype):
                raise TypeError(
                    f"hybrid_jax: state{path} is {jnp.result_type(x)}{list(np.shape(x))}, "
                    f"but the packed state's layout has {s.dtype}{list(s.shape)}: a state "
                    "keeps the shapes and dtypes of tx.init's; a step given a state of "
                    "other shapes packs it anew"
                )
            if s.packed:
                parts[s.index].append(jnp.ravel(x))
            else:
                kept.append(x)
        buffers = [jnp.concatenate(p) if len(p) > 1 else p[0] for p in parts]
        return PackedState(self, tuple(kept), tuple(buffers))

    def _part(self, buffers: tuple, i: int) -> jax.Array:
        s = self.slots[i]
        size = int(np.prod(s.shape, dtype=np.int64))
        buf = buffers[s.index]
        part = buf if size == buf.shape[0] else jax.lax.slice(buf, (s.start,), (s.start + size,))
        return part.reshape(s.shape)

    def unpack(self, packed: PackedState) -> PyTree:
        """The tree a ``PackedState`` of this layout holds; traceable (slices)."""
        if not isinstance(packed, PackedState) or packed.layout != self:
            got = packed.layout if isinstance(packed, PackedState) else type(packed).__name__
            raise TypeError(f"hybrid_jax: expected a PackedState of {self}; got {got}")
        leaves = [
            self._part(packed.buffers, i) if s.packed else packed.kept[s.index]
            for i, s in enumerate(self.slots)
        ]
        return jax.tree.unflatten(self.treedef, leaves)

    def __repr__(self) -> str:
        groups = ", ".join(f"{d}[{n}]" for d, n in zip(self.dtypes, self.sizes, strict=True))
        return f"StateLayout({self.kept} kept leaves; packed: {groups})"


@functools.cache
def _pack_small(layout: StateLayout):
    """Jitted: the packed leaves (in order) -> the buffers."""

    def pack(small: list[Any]) -> tuple:
        it = iter(small)
        leaves = [next(it) if s.packed else jnp.zeros(s.shape, s.dtype) for s in layout.slots]
        return layout.pack(jax.tree.unflatten(layout.treedef, leaves)).buffers

    return jax.jit(pack)


@functools.cache
def _read_small(layout: StateLayout, indices: tuple[int, ...]):
    """Jitted: the buffers -> the packed leaves ``indices`` (positions in the layout)."""
    return jax.jit(lambda buffers: [layout._part(buffers, i) for i in indices])


@jax.tree_util.register_pytree_with_keys_class
class PackedState:
    """A state whose small leaves are packed by dtype (see the module). Made by a step
    built with ``pack_state=True``; pass it back to a step as its state. Read-only:
    ``unpacked()`` is the ``HybridState`` to change (``_replace``) or save."""

    __slots__ = ("_cache", "buffers", "kept", "layout")

    def __init__(self, layout: StateLayout, kept: tuple, buffers: tuple):
        self.layout, self.kept, self.buffers = layout, kept, buffers
        self._cache: Any = None

    def tree_flatten_with_keys(self):
        key = jax.tree_util.GetAttrKey
        return ((key("kept"), self.kept), (key("buffers"), self.buffers)), self.layout

    @classmethod
    def tree_unflatten(cls, layout: StateLayout, children: Any) -> PackedState:
        return cls(layout, tuple(children[0]), tuple(children[1]))

    def _leaves(self, index_tree: Any) -> Any:
        """The leaves at these layout positions: kept ones as they are, packed ones read
        in one call."""
        self._check_alive()
        idx, treedef = jax.tree.flatten(index_tree)
        slots = self.layout.slots
        small = tuple(i for i in idx if slots[i].packed)
        values = _read_small(self.layout, small)(self.buffers) if small else []
        got = dict(zip(small, values, strict=True))
        out = [got[i] if slots[i].packed else self.kept[slots[i].index] for i in idx]
        return jax.tree.unflatten(treedef, out)

    def unpacked(self) -> Any:
        """The state this holds (its own tree of arrays; kept leaves are shared)."""
        if self._cache is None:
            self._cache = self._leaves(self.layout.index_tree)
        self._check_alive()
        return self._cache

    def _check_alive(self) -> None:
        for x in (*self.buffers, *self.kept):
            if getattr(x, "is_deleted", lambda: False)():
                raise RuntimeError(
                    "hybrid_jax: this packed state was donated to a step, which reused its "
                    "buffers: keep using the state the step returns (params, state, metrics "
                    "= step(params, state, batch))"
                )

    def __getattr__(self, name: str) -> Any:
        if name in ("_replace", "_asdict", "_fields", "_make"):
            raise AttributeError(
                f"a PackedState is read-only and has no {name}: change its HybridState, "
                f"state.unpacked().{name}(...), and pass that to the step (it packs it again)"
            )
        if name.startswith("_"):
            raise AttributeError(name)
        return self._leaves(getattr(self.layout.index_tree, name))

    def __repr__(self) -> str:
        return f"PackedState({self.layout!r})"


# Equal layouts as one object: a program's pytree compares the layout of every state it
# is given with the one it was compiled for, and the same object compares at once.
_LAYOUTS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def layout_of(tree: Any) -> StateLayout:
    """``StateLayout(tree)``, or the very object of an equal layout made before (kept
    while anything, such as the packing programs' cache, holds it)."""
    layout = StateLayout(tree)
    return _LAYOUTS.setdefault(layout._key, layout)


def _abstract(tree: Any) -> bool:
    return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def packed(state: Any, layout: StateLayout | None = None) -> PackedState:
    """``state`` packed (on the host: one small device call; for ``eval_shape``
    structures, their packed shapes), or as it is if packed."""
    if isinstance(state, PackedState):
        return state
    layout = layout or layout_of(state)
    if _abstract(state):
        return jax.eval_shape(layout.pack, state)
    leaves = layout.treedef.flatten_up_to(state)
    kept = tuple(x for x, s in zip(leaves, layout.slots, strict=True) if not s.packed)
    small = [x for x, s in zip(leaves, layout.slots, strict=True) if s.packed]
    return PackedState(layout, kept, tuple(_pack_small(layout)(small)))


def unpack_state(state: Any) -> Any:
    """The tree a ``PackedState`` holds; any other state as it is."""
    return state.unpacked() if isinstance(state, PackedState) else state


def signature(state: Any) -> StateLayout:
    """What a compiled program for ``state`` was built for: its structure, shapes and
    dtypes (and for a packed state, how it is packed)."""
    return state.layout if isinstance(state, PackedState) else layout_of(state)
