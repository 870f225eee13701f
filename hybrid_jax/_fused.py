"""A fused Predict phase's program and its host side (``make_dispatched_step(fuse_predict=True)``).

Stepped from Python, a phase is host-bound: a call's host cost grows with the arrays it
takes and returns (buffers, Python objects, donation bookkeeping). So the program
donates only the leaves a Predict phase changes (found once, by tracing: see
``hybrid_jax._carry``), takes the others undonated (XLA drops the fields it does not
read) and returns only the changed ones: for a ``HybridState``, the params and the
snapshot donated and the small leaves it changes returned; for a ``PackedState``
(``hybrid_jax._packing``), the params, its buffers and the kept leaves it changes. It
also returns every step's metrics as device arrays where they are few
(``ROW_OUTPUTS``), else the first step's, and what the host reads later (what the
phase found, the outlook of the step after it, and without the rows on the device,
the other steps' rows) packed into one int32 array that is copied to the host
asynchronously and read once. The two ways give the same values; rows read on the host
are numpy values, of the same dtypes for 32-bit metrics.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._carry import unchanged_leaves
from ._kinds import PREDICT, PREDICT_FIRST, kind_after_next, kind_of
from ._packing import PackedState
from ._predicted import phase_steps
from ._state import HybridState

PyTree = Any

TAIL = 5  # int32s after the rows: the outlook of the step after the phase (3), [taken, kind after]

# Up to this many arrays, the program returns every step's metrics as its own device
# arrays, so that the calls serving them need not wait for the phase; past it (a large
# metrics_fn), the rows are read on the host from the packed array (one wait per phase).
ROW_OUTPUTS = 32


def pack_rows(rows: Any) -> jax.Array:
    """Stacked metrics rows (leaves shaped ``(L, ...)``, 32-bit or bool) as one int32
    array ``(L, K)``, so that the host fetches them in one transfer."""
    cols = []
    for leaf in jax.tree.leaves(rows):
        flat = leaf.reshape(leaf.shape[0], -1)
        if jnp.issubdtype(flat.dtype, jnp.floating):
            flat = jax.lax.bitcast_convert_type(flat.astype(jnp.float32), jnp.int32)
        cols.append(flat.astype(jnp.int32))
    return jnp.concatenate(cols, axis=1)


class RowLayout:
    """How ``pack_rows`` lays out one row (``like``: a row, or its ``eval_shape``), worked
    out once, so that unpacking on the host is a few slices per row."""

    def __init__(self, like: Any):
        leaves, self.treedef = jax.tree.flatten(like)
        self.cols, at = [], 0
        for leaf in leaves:
            size = int(np.prod(leaf.shape, dtype=np.int64))
            floating = bool(jnp.issubdtype(leaf.dtype, jnp.floating))
            self.cols.append((at, at + size, tuple(leaf.shape), np.dtype(leaf.dtype), floating))
            at += size
        self.width = at

    def unpack(self, packed: np.ndarray) -> list[Any]:
        """``pack_rows``'s inverse on the host: one tree of numpy values per row."""
        per_leaf = []
        for start, stop, shape, dtype, floating in self.cols:
            col = np.ascontiguousarray(packed[:, start:stop])
            col = (col.view(np.float32) if floating else col).astype(dtype, copy=False)
            per_leaf.append(col.reshape(packed.shape[0], *shape))
        unflatten = self.treedef.unflatten
        return [unflatten([c[i] for c in per_leaf]) for i in range(packed.shape[0])]


def unpack_rows(packed: np.ndarray, like: Any) -> Any:
    """``pack_rows``'s inverse on the host, stacked (``like``: one row)."""
    rows = RowLayout(like).unpack(packed)
    return jax.tree.map(lambda *xs: np.stack(xs), *rows)


class PhaseResult:
    """What a fused phase's call left for the host: its packed rows and tail (an int32
    array on its way to the host), read once, when first needed, and (where the program
    returns them: ``ROW_OUTPUTS``) every step's metrics as device arrays."""

    def __init__(self, packed: jax.Array, layout: RowLayout, length: int, shown: tuple = ()):
        self._packed, self._layout, self._length = packed, layout, length
        self._shown = shown
        self._host: np.ndarray | None = None
        self._rows: list[Any] | None = None
        packed.copy_to_host_async()

    def host(self) -> np.ndarray:
        """The whole packed array on the host (waits for the phase the first time)."""
        if self._host is None:
            self._host = np.asarray(self._packed)
            self._packed = None
        return self._host

    def row(self, i: int) -> Any:
        """Step ``i``'s metrics row: device arrays where the program returned them (no
        wait), else host values."""
        if self._shown:
            return self._shown[i]
        if self._rows is None:
            flat = self.host()[: self._length * self._layout.width]
            self._rows = self._layout.unpack(flat.reshape(self._length, self._layout.width))
        return self._rows[i]

    def outlook(self) -> np.ndarray:
        """int32[3]: ``outlook`` of the state after the phase."""
        return self.host()[-TAIL:-2]

    def actual(self) -> np.ndarray:
        """int32[2]: how many steps the phase took and the kind of step after it."""
        return self.host()[-2:]


def outlook(tx: Any, state: HybridState) -> jax.Array:
    """int32[3]: ``kind_after_next(state)``; and where ``state`` wants a predicted step,
    how many steps its fused phase program will take and the kind of the step after
    them (else 0 and -1). Exact: the phase's small state does not read the parameters."""
    cfg = tx.config

    def ahead(s: HybridState) -> jax.Array:
        moving, _, taken, _ = phase_steps(tx.setup, s, length=cfg.max_horizon)
        return jnp.stack([taken, kind_of(cfg, s._replace(**moving))])

    kind = kind_of(cfg, state)
    wants = (kind == PREDICT_FIRST) | (kind == PREDICT)
    none = lambda s: jnp.asarray([0, -1], jnp.int32)
    info = jax.lax.cond(wants, ahead, none, state)
    return jnp.concatenate([kind_after_next(cfg, state)[None], info]).astype(jnp.int32)


class FusedPhase:
    """The program of a fused Predict phase for ``tx`` (see the module), built for the
    shapes of ``params`` and ``state`` (a ``HybridState`` or a ``PackedState``, which it
    then takes and returns). ``phase(params, state) -> (params, state, first, result)``:
    the params and state after the whole phase, its first step's metrics (device
    scalars) and a ``PhaseResult``."""

    def __init__(self, tx: Any, metrics_fn: Callable, params: PyTree, state: Any, *, donate: bool):
        length = self.length = tx.config.max_horizon
        run = functools.partial(_run, tx, metrics_fn, length)
        self.packed = isinstance(state, PackedState)
        row = jax.eval_shape(lambda s: metrics_fn(_tree(s)), state)
        if not jax.tree.leaves(row):
            raise ValueError(
                "fuse_predict=True needs a metrics_fn that returns at least one array (a "
                "phase's rows are its values); e.g. metrics_fn=lambda s: s.step"
            )
        self.layout = RowLayout(row)
        self.every_row = (length - 1) * len(jax.tree.leaves(row)) <= ROW_OUTPUTS
        show = functools.partial(_for_host, tx, self.every_row)
        if self.packed:  # the leaves the phase changes are donated and returned; not the rest
            whole = functools.partial(_packed_program, show, run)
            same = unchanged_leaves(lambda s: whole(params, s)[1], state)
            self.moving = tuple(i for i, s in enumerate(same) if not s)
            self.fixed = tuple(i for i, s in enumerate(same) if s)
            program = functools.partial(_split_program, whole, jax.tree.structure(state), same)
        else:
            rest = state._replace(snapshot=None)
            same = unchanged_leaves(lambda r: run(params, state.snapshot, r)[1], rest)
            self.changed = tuple(i for i, s in enumerate(same) if not s)
            program = functools.partial(_program, show, run, self.changed)
        self.jitted = jax.jit(program, donate_argnums=(0, 1) if donate else ())
        self._call = self.jitted

    def _args(self, params: PyTree, state: Any) -> tuple:
        if self.packed:
            leaves = jax.tree.leaves(state)
            return params, [leaves[i] for i in self.moving], [leaves[i] for i in self.fixed]
        return params, state.snapshot, state._replace(snapshot=None)

    def compile(self, params: PyTree, state: Any) -> None:
        """Compiles the program now (nothing runs, nothing is donated)."""
        self._call = self.jitted.lower(*self._args(params, state)).compile()

    def __call__(self, params: PyTree, state: Any):
        if self.packed:
            leaves, treedef = jax.tree.flatten(state)
            params, moved, shown, packed = self._call(*self._args(params, state))
            for i, x in zip(self.moving, moved, strict=True):
                leaves[i] = x
            state = jax.tree.unflatten(treedef, leaves)
            return params, state, shown[0], self._result(packed, shown)
        rest = state._replace(snapshot=None)
        params, snapshot, changed, shown, packed = self._call(params, state.snapshot, rest)
        leaves, treedef = jax.tree.flatten(rest)
        for i, x in zip(self.changed, changed, strict=True):
            leaves[i] = x
        state = jax.tree.unflatten(treedef, leaves)._replace(snapshot=snapshot)
        return params, state, shown[0], self._result(packed, shown)

    def _result(self, packed: jax.Array, shown: tuple) -> PhaseResult:
        return PhaseResult(packed, self.layout, self.length, shown if self.every_row else ())


def _tree(state: Any) -> HybridState:
    return state.layout.unpack(state) if isinstance(state, PackedState) else state


def _for_host(
    tx: Any, every_row: bool, rows: Any, taken: jax.Array, whole: HybridState
) -> tuple[tuple, jax.Array]:
    """The metrics rows the program returns as they are (every step's with
    ``every_row``, else the first step's), and the rows, outlook and findings packed
    for the host."""
    found = jnp.stack([taken, kind_of(tx.config, whole)])
    tail = jnp.concatenate([outlook(tx, whole), found]).astype(jnp.int32)
    if every_row:  # the rows stay on the device; the host reads the tail only
        length = jax.tree.leaves(rows)[0].shape[0]
        return tuple(jax.tree.map(functools.partial(_take, i), rows) for i in range(length)), tail
    packed = jnp.concatenate([pack_rows(rows).reshape(-1), tail])
    return (jax.tree.map(functools.partial(_take, 0), rows),), packed


def _take(i: int, stacked: jax.Array) -> jax.Array:
    return stacked[i]


def _program(show: Callable, run: Callable, changed: tuple[int, ...], params, snapshot, rest):
    """The phase on a ``HybridState`` split as ``snapshot`` (donated) and ``rest``; returns
    only the leaves of the state that change."""
    params, new, rows, taken, snapshot = run(params, snapshot, rest)
    shown, packed = show(rows, taken, new._replace(snapshot=snapshot))
    leaves = jax.tree.leaves(new)
    return params, snapshot, tuple(leaves[i] for i in changed), shown, packed


def _split_program(whole: Callable, treedef: Any, same: tuple[bool, ...], params, moving, fixed):
    """``whole`` on a ``PackedState`` given as the leaves the phase changes (``moving``,
    donated) and those it does not (``fixed``); returns only the changed ones."""
    moving, fixed = iter(moving), iter(fixed)
    state = jax.tree.unflatten(treedef, [next(fixed) if s else next(moving) for s in same])
    params, new, shown, packed = whole(params, state)
    leaves = jax.tree.leaves(new)
    return params, [x for x, s in zip(leaves, same, strict=True) if not s], shown, packed


def _packed_program(show: Callable, run: Callable, params, state: PackedState):
    """The phase on a ``PackedState``: returns the whole (packed) state after it."""
    whole = state.layout.unpack(state)
    params, new, rows, taken, snapshot = run(params, whole.snapshot, whole._replace(snapshot=None))
    whole = new._replace(snapshot=snapshot)
    shown, packed = show(rows, taken, whole)
    return params, state.layout.pack(whole), shown, packed


def _run(tx: Any, metrics_fn: Callable, length: int, params, snapshot, rest):
    """The phase on ``rest`` (a state without its snapshot): ``(params, new, rows, taken,
    snapshot)``, ``new`` the state after it without its snapshot."""
    state = rest._replace(snapshot=snapshot)
    params, state, rows, taken = tx.predicted_phase(
        state, params, length=length, metrics_fn=metrics_fn, unroll=True
    )
    return params, state._replace(snapshot=None), rows, taken, state.snapshot
