"""Parameter-shaped directions built from real optimizer updates.

The basis holds ``B = basis_size`` directions per parameter leaf. Their *logical*
order, the one every coefficient vector uses, is::

    0: the last real update      u_t
    1: an EMA of real updates    m_t = d m_{t-1} + (1 - d) u_t   (m_0 = u_0)
    2..B-1: older real updates   u_{t-1}, u_{t-2}, ...

They are stored as two pytrees shaped like the parameters: ``ema`` (per leaf:
``leaf.shape``) and ``ring`` (per leaf: ``(B - 1, *leaf.shape)``), a ring of raw updates
whose newest slot is ``head``. A real step writes the EMA and one ring slot (no
shifting). The *physical* slots used by coefficient vectors in storage order are
``0: ema, 1 + r: ring[r]``. The EMA is its own buffer so that its new value, the
update's inner products and the parameters' new value can come out of one fused pass
over the update; with ``B = 2`` the ring slot is too (written by a select, not an
in-place update).

**Stride.** With ``stride = S > 1`` a direction is the displacement over ``S`` real
steps instead of one real update: an accumulator (one more parameter-sized buffer,
``Accumulator``) sums the real updates since the last push, and every ``S``-th real
update pushes the sum. The EMA then starts from zero, so that ``ema / (1 - d)`` is
``sum_j d^j disp_{t-j}`` exactly (SNOO's outer momentum). Each real update is still fitted
onto the basis; during a Predict phase the basis is frozen (``transition`` is the
identity), so predicted coefficients are each step's update over the frozen basis.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from .config import HybridConfig

PyTree = Any


class Accumulator(NamedTuple):
    """The real updates since the last push (``stride > 1``), and their inner products."""

    total: PyTree  # per leaf: leaf.shape, the sum of the updates
    bu: jax.Array  # (G, B) float32: the directions vs ``total``, logical order
    uu: jax.Array  # (G,) float32: ``total`` with itself
    n: jax.Array  # int32: updates in ``total``


class Basis(NamedTuple):
    """Direction buffers; see the module docstring for the layout."""

    ema: PyTree  # per leaf: leaf.shape
    ring: PyTree  # per leaf: (B - 1, *leaf.shape)
    head: jax.Array  # int32: ring slot (0..B-2) of the newest direction
    count: jax.Array  # int32: directions pushed so far
    gram: jax.Array  # (G, B, B) float32: inner products of the directions, logical order
    acc: Accumulator | None = None  # stride > 1 only


class Gram(NamedTuple):
    """Inner products, per coefficient group, in logical order (float32)."""

    bb: jax.Array  # (G, B, B): basis vs basis
    bu: jax.Array  # (G, B): basis vs the new update
    uu: jax.Array  # (G,): the new update with itself
    au: jax.Array | None = None  # (G,): the accumulator vs the new update (stride > 1)


def storage_dtype(leaf_dtype: Any, basis_dtype: str) -> Any:
    """The dtype a leaf's directions are stored in."""
    if basis_dtype == "params":
        return leaf_dtype
    return jnp.dtype(basis_dtype)


def init(params: PyTree, size: int, basis_dtype: str, n_groups: int, stride: int = 1) -> Basis:
    """Zero directions shaped like ``params`` (and, with ``stride > 1``, a zero
    accumulator)."""
    dtype = lambda p: storage_dtype(p.dtype, basis_dtype)
    ema = jax.tree.map(lambda p: jnp.zeros(p.shape, dtype(p)), params)
    ring = jax.tree.map(lambda p: jnp.zeros((size - 1, *p.shape), dtype(p)), params)
    zero = jnp.zeros((), jnp.int32)
    acc = None
    if stride > 1:
        acc = Accumulator(
            total=jax.tree.map(lambda p: jnp.zeros(p.shape, dtype(p)), params),
            bu=jnp.zeros((n_groups, size), jnp.float32),
            uu=jnp.zeros((n_groups,), jnp.float32),
            n=zero,
        )
    gram = jnp.zeros((n_groups, size, size), jnp.float32)
    return Basis(ema=ema, ring=ring, head=zero, count=zero, gram=gram, acc=acc)


def size_of(basis: Basis) -> int:
    """``B``, the number of directions."""
    return 1 + jax.tree.leaves(basis.ring)[0].shape[0]


def slots(basis: Basis) -> list[list[jax.Array]]:
    """Per parameter leaf, its ``B`` directions in physical order (static slices)."""
    rings = jax.tree.leaves(basis.ring)
    return [
        [e, *(r[i] for i in range(r.shape[0]))]
        for e, r in zip(jax.tree.leaves(basis.ema), rings, strict=True)
    ]


def physical_index(head: jax.Array, size: int) -> jax.Array:
    """``idx[l]`` = physical slot (0: ema, 1 + r: ring[r]) of logical direction ``l``."""
    ring = size - 1
    lags = jnp.arange(size - 2, dtype=jnp.int32)  # lag j = 1 .. size-2 at logical 2+j-1
    older = 1 + jnp.mod(head - 1 - lags, ring)
    return jnp.concatenate([jnp.stack([1 + head, jnp.int32(0)]), older]).astype(jnp.int32)


def sample_rows(x: jax.Array, stride: int) -> tuple[jax.Array, float]:
    """Every ``stride``-th row of ``x`` seen as ``(-1, last axis)``, and the factor that
    scales a sum over those rows up to the whole array.

    Arrays with fewer than ``stride`` rows (and scalars and vectors) are returned whole,
    with factor 1. The rows are a strided slice: contiguous in memory, so reading them
    costs about ``1 / stride`` of a pass over ``x``.
    """
    if stride <= 1 or x.ndim < 2:
        return x, 1.0
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] < stride:
        return x, 1.0
    picked = rows[::stride]
    return picked, rows.shape[0] / picked.shape[0]


def gram(
    basis: Basis,
    update: PyTree,
    group_of_leaf: tuple[int, ...],
    n_groups: int,
    stride: int = 1,
) -> Gram:
    """Inner products of ``update`` with the basis, summed within each group.

    The directions' own Gram matrix is tracked in ``basis.gram`` (``push`` keeps it), so
    this reads each buffer once: ``B`` products with the update and its square norm,
    written as elementwise products and sums that XLA fuses. With ``stride > 1`` they
    read every ``stride``-th row of each leaf (``sample_rows``), scaled up to the leaf.
    """
    size = size_of(basis)
    bu = jnp.zeros((n_groups, size), jnp.float32)
    uu = jnp.zeros((n_groups,), jnp.float32)
    au = jnp.zeros((n_groups,), jnp.float32)
    accs = [None] * len(group_of_leaf) if basis.acc is None else jax.tree.leaves(basis.acc.total)
    leaves = zip(group_of_leaf, slots(basis), jax.tree.leaves(update), accs, strict=True)
    for g, v, u, a in leaves:
        u32, factor = sample_rows(u, stride)
        u32 = u32.astype(jnp.float32)
        dots = [jnp.sum(sample_rows(b, stride)[0].astype(jnp.float32) * u32) for b in v]
        bu = bu.at[g].add(factor * jnp.stack(dots))
        uu = uu.at[g].add(factor * jnp.sum(u32 * u32))
        if a is not None:
            au = au.at[g].add(factor * jnp.sum(sample_rows(a, stride)[0].astype(jnp.float32) * u32))
    idx = physical_index(basis.head, size)
    return Gram(basis.gram, bu[:, idx], uu, None if basis.acc is None else au)


def fit(g: Gram, ridge: float) -> tuple[jax.Array, jax.Array]:
    """Least-squares coefficients of the update over the basis, and the fit's R^2.

    Solves ``(BB + lam I) c = Bu`` per group with ``lam = ridge * trace(BB) / B``
    (plus a floor so that an all-zero basis gives zero coefficients).

    Returns:
      ``(coefs (G, B), r2 (G,))``; R^2 is 0 where the update is zero.
    """
    size = g.bb.shape[-1]
    scale = jnp.trace(g.bb, axis1=-2, axis2=-1) / size
    lam = ridge * scale + 1e-30
    eye = jnp.eye(size, dtype=jnp.float32)
    coefs = spd_solve(g.bb + lam[:, None, None] * eye, g.bu)
    resid = g.uu - 2.0 * jnp.sum(coefs * g.bu, -1) + jnp.einsum("gb,gbc,gc->g", coefs, g.bb, coefs)
    r2 = jnp.where(g.uu > 0, 1.0 - resid / jnp.where(g.uu > 0, g.uu, 1.0), 0.0)
    return coefs, r2


def spd_solve(a: jax.Array, b: jax.Array) -> jax.Array:
    """Solves ``a x = b`` for batched small symmetric positive definite ``a`` (..., n, n).

    An unrolled Cholesky factorisation: a handful of tiny fused operations instead of
    a call into a dense solver library (which costs several kernel launches on GPU).
    """
    n = a.shape[-1]
    low = [[None] * n for _ in range(n)]
    for j in range(n):
        d = a[..., j, j] - sum(low[j][k] ** 2 for k in range(j))
        low[j][j] = jnp.sqrt(jnp.maximum(d, 1e-30))
        for i in range(j + 1, n):
            off = a[..., i, j] - sum(low[i][k] * low[j][k] for k in range(j))
            low[i][j] = off / low[j][j]
    y = [None] * n
    for i in range(n):
        y[i] = (b[..., i] - sum(low[i][k] * y[k] for k in range(i))) / low[i][i]
    x = [None] * n
    for i in reversed(range(n)):
        x[i] = (y[i] - sum(low[k][i] * x[k] for k in range(i + 1, n))) / low[i][i]
    return jnp.stack(x, axis=-1)


def cosine(g: Gram, coefs: jax.Array) -> jax.Array:
    """Cosine, over all groups together, between ``sum_b coefs[:, b] basis_b`` and the update."""
    dot = jnp.sum(coefs * g.bu)
    pp = jnp.sum(jnp.einsum("gb,gbc,gc->g", coefs, g.bb, coefs))
    den = jnp.sqrt(jnp.maximum(pp, 0.0) * jnp.sum(g.uu))
    return jnp.where(den > 0, dot / jnp.where(den > 0, den, 1.0), 0.0)


def push(
    basis: Basis,
    update: PyTree,
    g: Gram,
    decay: float,
    keep: jax.Array | bool = True,
    stride: int = 1,
    restart: jax.Array | bool = False,
) -> Basis:
    """Adds a real update: it becomes the last direction, enters the EMA and the ring;
    with ``stride > 1`` it enters the accumulator, whose sum is pushed (and the
    accumulator emptied) at every ``stride``-th update. ``restart``: the EMA starts
    anew at this update (the updates it averaged are long past; ``stride == 1`` only).

    ``g`` is ``gram(basis, update, ...)``; the new directions' Gram matrix follows from
    it without another pass over the parameters. With ``keep`` false the basis is
    returned unchanged; the choice is a select of the written values (never a branch
    over whole buffers), so that XLA fuses it and writes the buffers in place.
    """
    keep = jnp.asarray(keep)
    if basis.acc is None:
        first = (basis.count == 0) | jnp.asarray(restart)
        return _push_direction(basis, update, g, decay, keep, first)
    acc = basis.acc
    total = jax.tree.map(lambda a, u: a + u.astype(a.dtype), acc.total, update)
    bd = acc.bu + g.bu
    dd = acc.uu + 2.0 * g.au + g.uu
    due = keep & (acc.n + 1 >= stride)
    pushed = _push_direction(basis, total, Gram(g.bb, bd, dd), decay, due, False)
    grow = keep & ~due
    new_acc = Accumulator(
        total=jax.tree.map(
            lambda t, a: jnp.where(due, jnp.zeros_like(a), jnp.where(grow, t, a)), total, acc.total
        ),
        bu=jnp.where(due, 0.0, jnp.where(grow, bd, acc.bu)),
        uu=jnp.where(due, 0.0, jnp.where(grow, dd, acc.uu)),
        n=jnp.where(due, 0, acc.n + grow.astype(jnp.int32)).astype(jnp.int32),
    )
    return pushed._replace(acc=new_acc)


def _push_direction(
    basis: Basis, direction: PyTree, g: Gram, decay: float, keep: jax.Array, first
) -> Basis:
    """``direction`` (whose inner products are ``g``) becomes the newest direction where
    ``keep``; ``first``: the EMA starts at it (else it starts from zero)."""
    size = size_of(basis)
    head = jnp.where(keep, jnp.mod(basis.head + 1, size - 1), basis.head).astype(jnp.int32)

    def ema(e: jax.Array, u: jax.Array) -> jax.Array:
        u = u.astype(e.dtype)
        new = jnp.where(first, u, decay * e + (1.0 - decay) * u).astype(e.dtype)
        return jnp.where(keep, new, e)

    def write_ring(r: jax.Array, u: jax.Array) -> jax.Array:
        u = u.astype(r.dtype)
        if r.shape[0] == 1:  # elementwise: fuses with the other passes over the update
            return jnp.where(keep, u[None], r)
        slot = jax.lax.dynamic_index_in_dim(r, head, axis=0, keepdims=False)
        return jax.lax.dynamic_update_index_in_dim(r, jnp.where(keep, u, slot), head, axis=0)

    new_ema = jax.tree.map(ema, basis.ema, direction)
    new_ring = jax.tree.map(write_ring, basis.ring, direction)
    a = _shift(size, decay, first)  # (B, B+1) over [old directions..., update]
    ext = jnp.concatenate(
        [
            jnp.concatenate([g.bb, g.bu[:, :, None]], axis=2),
            jnp.concatenate([g.bu[:, None, :], g.uu[:, None, None]], axis=2),
        ],
        axis=1,
    )
    new_gram = jnp.where(keep, jnp.einsum("ij,gjk,lk->gil", a, ext, a), basis.gram)
    return basis._replace(
        ema=new_ema,
        ring=new_ring,
        head=head,
        count=basis.count + keep.astype(jnp.int32),
        gram=new_gram,
    )


def _shift(size: int, decay: float, first: jax.Array | bool = False) -> jax.Array:
    """Matrix (B, B+1) giving the new directions from ``[old directions..., update]``."""
    eye = jnp.eye(size + 1, dtype=jnp.float32)
    ema_row = jnp.where(first, eye[size], decay * eye[1] + (1.0 - decay) * eye[size])
    rows = [eye[size], ema_row]
    if size > 2:
        rows.append(eye[0])
        rows.extend(eye[j] for j in range(2, size - 1))
    return jnp.stack(rows)


def combine(basis: Basis, coefs: jax.Array, group_of_leaf: tuple[int, ...], like: PyTree) -> PyTree:
    """``sum_b coefs[g, b] * basis_b`` per leaf (logical ``coefs`` of shape (G, B)).

    The result has the structure and dtypes of ``like`` (the parameters).
    """
    size = coefs.shape[-1]
    idx = physical_index(basis.head, size)
    phys = jnp.zeros_like(coefs).at[:, idx].set(coefs)
    leaves, treedef = jax.tree.flatten(like)
    out = []
    for g, v, p in zip(group_of_leaf, slots(basis), leaves, strict=True):
        # An unrolled sum (not a dot) so that XLA fuses it with the parameter write.
        d = sum(phys[g, b] * v[b].astype(jnp.float32) for b in range(size))
        out.append(d.astype(p.dtype))
    return jax.tree.unflatten(treedef, out)


def transition(coefs: jax.Array, decay: float, stride: int = 1) -> jax.Array:
    """Matrix ``M(c)`` (G, B, B) taking the directions to those after a step whose
    update is ``sum_b c_b direction_b``: the update becomes the last direction, enters
    the EMA, and the older directions shift by one. With ``stride > 1`` the basis is
    frozen during a Predict phase: the identity."""
    size = coefs.shape[-1]
    if stride > 1:
        return jnp.broadcast_to(jnp.eye(size, dtype=jnp.float32), (coefs.shape[0], size, size))
    a = _shift(size, decay)
    return a[None, :, :size] + a[None, :, size:] * coefs[:, None, :]


def norm(basis: Basis, coefs: jax.Array) -> jax.Array:
    """Global norm of ``sum_b coefs[g, b] direction_b`` from the Gram matrix."""
    sq = jnp.einsum("gb,gbc,gc->", coefs, basis.gram, coefs)
    return jnp.sqrt(jnp.maximum(sq, 0.0))


class Layout(NamedTuple):
    """Which coefficient group each parameter leaf belongs to."""

    groups: tuple[int, ...]
    n_groups: int


def layout(cfg: HybridConfig, params: PyTree) -> Layout:
    """The coefficient groups of ``params``; checks that they are floating point."""
    leaves = jax.tree.leaves(params)
    if not leaves:
        raise ValueError("hj.predictive: params has no leaves")
    for leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise ValueError(f"hj.predictive: params must be floating point; got {leaf.dtype}")
    if cfg.basis.coef_groups == "global":
        return Layout((0,) * len(leaves), 1)
    return Layout(tuple(range(len(leaves))), len(leaves))
