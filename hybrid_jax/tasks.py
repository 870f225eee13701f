"""Small real, offline tasks used by the tests, the benchmarks, the notebooks and the CLI.

- ``digits``: scikit-learn's 1,797 real 8x8 handwritten digits, split once into train
  and held-out parts, with an MLP classifier.

Nothing here downloads anything.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any


class Split(NamedTuple):
    """A train / held-out split of arrays."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def digits(seed: int = 0, test_fraction: float = 0.2) -> Split:
    """scikit-learn's digits, pixels scaled to [0, 1], split at random (seeded).

    Args:
      seed: seed of the split.
      test_fraction: share of the 1,797 images held out, in (0, 1).

    Returns:
      A ``Split`` of float32 images (n, 64) and int32 labels.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the digits task needs scikit-learn: pip install scikit-learn") from e
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return Split(x[train], y[train], x[test], y[test])


def batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, start: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless minibatches, reshuffled every epoch; batch ``i`` depends only on ``(seed, i)``.

    Args:
      x, y: the arrays to draw from (same length).
      batch_size: examples per batch (<= len(x)).
      seed: seed of the order.
      start: index of the first batch to yield (to resume a run exactly).

    Yields:
      ``(x_batch, y_batch)``.
    """
    n = len(x)
    if not 0 < batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}]; got {batch_size}")
    per_epoch = n // batch_size
    i = start
    while True:
        epoch, j = divmod(i, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(n)
        idx = order[j * batch_size : (j + 1) * batch_size]
        yield x[idx], y[idx]
        i += 1


def mlp_init(key: jax.Array, sizes: tuple[int, ...] = (64, 128, 10)) -> dict[str, jax.Array]:
    """He-initialised MLP parameters ``{"w0", "b0", "w1", "b1", ...}`` (float32)."""
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        key, sub = jax.random.split(key)
        params[f"w{i}"] = jax.random.normal(sub, (a, b), jnp.float32) * jnp.sqrt(2.0 / a)
        params[f"b{i}"] = jnp.zeros((b,), jnp.float32)
    return params


def mlp_logits(params: PyTree, x: jax.Array) -> jax.Array:
    """ReLU MLP forward pass."""
    n = len(params) // 2
    h = x
    for i in range(n):
        h = h @ params[f"w{i}"].astype(h.dtype) + params[f"b{i}"].astype(h.dtype)
        if i < n - 1:
            h = jax.nn.relu(h)
    return h


def mlp_loss(params: PyTree, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Mean softmax cross-entropy of the MLP on ``batch = (x, labels)`` (float32)."""
    x, labels = batch
    logits = mlp_logits(params, x).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def mlp_accuracy(params: PyTree, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Share of correct labels."""
    x, labels = batch
    return jnp.mean(jnp.argmax(mlp_logits(params, x), -1) == labels)
