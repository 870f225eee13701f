"""A clear error for arrays that a donating step has already consumed.

A step compiled with donation (``make_hybrid_step``, ``make_dispatched_step``,
``hj.train``) writes its outputs into the buffers of the params and state it was given,
and those input arrays are deleted. Passing one of them again makes JAX fail with a
message about a deleted buffer that does not say why. Here the step's call is wrapped:
when it fails and one of its arguments is a deleted array (``jax.Array.is_deleted``,
checked only on that error path, so a healthy step pays nothing), the error is raised
again naming the argument, donation, and the fix.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

PyTree = Any

FIX = (
    "keep using the params and state the step returns "
    "(params, state, metrics = step(params, state, batch)), or build the step with "
    "donate=False to keep its inputs alive (then inputs and outputs both take memory)"
)

TRAIN_FIX = (
    "hj.train donates the params and state it is given; pass result.params and "
    "result.state of the run that consumed them, or a copy made before it "
    "(jax.tree.map(jnp.copy, params))"
)


def deleted_leaf(tree: PyTree, name: str) -> str | None:
    """The path and shape of the first deleted array in ``tree`` (``None`` if none)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        is_deleted = getattr(leaf, "is_deleted", None)
        if is_deleted is not None and is_deleted():
            return f"{name}{jax.tree_util.keystr(path)} ({leaf.dtype}{list(leaf.shape)})"
    return None


def donated_error(where: str, params: PyTree, state: Any, fix: str = FIX) -> RuntimeError | None:
    """The error to raise when ``params`` or ``state`` holds a deleted array, else ``None``."""
    leaf = deleted_leaf(params, "params") or deleted_leaf(state, "state")
    if leaf is None:
        return None
    return RuntimeError(
        f"{where}: {leaf} was deleted: it was passed to a step that donates its params and "
        f"state, which reuses their buffers for its outputs. To fix: {fix}."
    )


def explain_donation(where: str, call: Callable[..., Any]) -> Callable[..., Any]:
    """``call(params, state, ...)`` that re-raises a failure on a donated (deleted)
    argument as a ``RuntimeError`` naming it and the fix (the original chained)."""

    @functools.wraps(call)
    def checked(params: PyTree, state: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return call(params, state, *args, **kwargs)
        except (RuntimeError, ValueError) as e:
            err = donated_error(where, params, state)
            if err is None:
                raise
            raise err from e

    return checked


class DonatingStep:
    """A jitted step ``(params, state, ...)`` whose failures on donated arguments are
    explained (see ``explain_donation``); every other attribute (``lower``,
    ``_cache_size``, ...) is the jitted function's."""

    def __init__(self, jitted: Callable[..., Any], where: str):
        self._jitted = jitted
        self._call = explain_donation(where, jitted)
        functools.update_wrapper(self, jitted)

    def __call__(self, params: PyTree, state: Any, *args: Any, **kwargs: Any) -> Any:
        return self._call(params, state, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == "_jitted":  # not set yet (e.g. while copying): no recursion
            raise AttributeError(name)
        return getattr(self._jitted, name)
