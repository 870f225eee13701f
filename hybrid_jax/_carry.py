"""Which leaves a function passes through as they are, and a scan that carries only the rest.

A leaf that a traced function returns as the very value it was given (the same tracer)
is known, at trace time, not to change. A compiled program need not return such a leaf
(the caller still holds it), and a ``lax.scan`` need not carry it. This matters on the
host: every array a program returns costs a buffer and a Python object per call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def unchanged_leaves(fn: Callable[[PyTree], PyTree], tree: PyTree) -> tuple[bool, ...]:
    """For each leaf of ``tree``, whether ``fn(tree)`` (a tree of the same structure)
    returns that leaf as it is. Traces ``fn`` once (abstractly; nothing runs)."""
    flags: list[bool] = []

    def probe(t: PyTree) -> PyTree:
        out = fn(t)
        pairs = zip(jax.tree.leaves(out), jax.tree.leaves(t), strict=True)
        flags.extend(o is i for o, i in pairs)
        return out

    jax.eval_shape(probe, tree)
    return tuple(flags)


def scan_changing(
    body: Callable[[PyTree, Any], tuple[PyTree, Any]],
    carry: PyTree,
    *,
    length: int,
    unroll: int | bool = 1,
) -> tuple[PyTree, Any]:
    """``jax.lax.scan(body, carry, None, length=length, unroll=unroll)``, carrying only the
    leaves that ``body`` changes: the others are passed through as they are (the same
    values, so a caller can tell them by identity; see ``unchanged_leaves``)."""
    keep = unchanged_leaves(lambda c: body(c, None)[0], carry)
    leaves, treedef = jax.tree.flatten(carry)

    def merge(moving: list[Any]) -> PyTree:
        it = iter(moving)
        return jax.tree.unflatten(
            treedef, [x if k else next(it) for x, k in zip(leaves, keep, strict=True)]
        )

    def split(tree: PyTree) -> list[Any]:
        return [x for x, k in zip(treedef.flatten_up_to(tree), keep, strict=True) if not k]

    def inner(moving: list[Any], x: Any) -> tuple[list[Any], Any]:
        new, y = body(merge(moving), x)
        return split(new), y

    moving, ys = jax.lax.scan(inner, split(carry), None, length=length, unroll=unroll)
    return merge(moving), ys


def choose(cond: jax.Array, a: PyTree, b: PyTree) -> PyTree:
    """``jnp.where(cond, a, b)`` leaf by leaf (``cond`` a scalar); a leaf that is the same
    value in both is passed through as it is (see ``unchanged_leaves``)."""
    return jax.tree.map(lambda x, y: x if x is y else jnp.where(cond, x, y), a, b)
