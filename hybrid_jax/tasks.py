"""Small real, offline tasks used by the tests, the benchmarks, the notebooks and the CLI.

- ``digits``: scikit-learn's 1,797 real 8x8 handwritten digits, split once into train
  and held-out parts, with an MLP classifier.

Nothing here downloads anything.
"""

from __future__ import annotations

import itertools
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
    n_test = round(len(x) * test_fraction)
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
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
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


def cnn_init(key: jax.Array, channels: tuple[int, int] = (16, 32)) -> dict[str, jax.Array]:
    """A small convolutional net for the 8x8 digits: two 3x3 convolutions (ReLU), a mean
    over the image, a dense layer to 10 classes (He-initialised, float32)."""
    k1, k2, k3 = jax.random.split(key, 3)
    c1, c2 = channels
    he = lambda k, shape, fan_in: jax.random.normal(k, shape, jnp.float32) * jnp.sqrt(2.0 / fan_in)
    return {
        "conv0": he(k1, (3, 3, 1, c1), 9),
        "bias0": jnp.zeros((c1,), jnp.float32),
        "conv1": he(k2, (3, 3, c1, c2), 9 * c1),
        "bias1": jnp.zeros((c2,), jnp.float32),
        "dense": he(k3, (c2, 10), c2),
        "bias2": jnp.zeros((10,), jnp.float32),
    }


def cnn_logits(params: PyTree, x: jax.Array) -> jax.Array:
    """Forward pass on flat digits ``x`` of shape (n, 64)."""
    h = x.reshape(-1, 8, 8, 1)
    for i in range(2):
        h = jax.lax.conv_general_dilated(
            h, params[f"conv{i}"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        h = jax.nn.relu(h + params[f"bias{i}"])
    return h.mean(axis=(1, 2)) @ params["dense"] + params["bias2"]


def cnn_loss(params: PyTree, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Mean softmax cross-entropy of the CNN on ``batch = (x, labels)``."""
    x, labels = batch
    logits = cnn_logits(params, x).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# -- byte-level language modelling on offline text -----------------------------------


def stdlib_text(max_bytes: int = 4_000_000, seed: int = 0) -> bytes:
    """Python's own standard-library source as bytes (offline, no install).

    Files are read in a seeded order until ``max_bytes`` is reached.
    """
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    if not files:
        raise RuntimeError(f"no Python source found under {root}")
    order = np.random.default_rng(seed).permutation(len(files))
    chunks, total = [], 0
    for i in order:
        try:
            data = files[i].read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return b"".join(chunks)[:max_bytes]


def byte_split(text: bytes, test_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Train and held-out byte arrays (uint8): the held-out part is the text's tail."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction}")
    arr = np.frombuffer(text, np.uint8)
    cut = int(len(arr) * (1.0 - test_fraction))
    return arr[:cut], arr[cut:]


def token_batches(
    data: np.ndarray, batch_size: int, seq_len: int, seed: int, start: int = 0
) -> Iterator[np.ndarray]:
    """Endless int32 windows of ``seq_len + 1`` tokens at seeded random offsets.

    Batch ``i`` depends only on ``(seed, i)``; ``start`` skips to batch ``start``.
    """
    if len(data) <= seq_len + 1:
        raise ValueError(f"data ({len(data)} tokens) is shorter than seq_len + 1 ({seq_len + 1})")
    i = start
    while True:
        rng = np.random.default_rng([seed, i])
        offsets = rng.integers(0, len(data) - seq_len - 1, size=batch_size)
        yield np.stack([data[o : o + seq_len + 1] for o in offsets]).astype(np.int32)
        i += 1


class GPTConfig(NamedTuple):
    """A GPT-style decoder. ``compute_dtype`` is used for matrix products.

    ``attention``: ``"xla"``, ``"cudnn"`` (fused flash attention, GPU and 16-bit only) or
    ``"auto"`` (cuDNN where it applies, else XLA).
    """

    vocab: int = 256
    seq_len: int = 128
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: int = 4
    compute_dtype: str = "float32"
    attention: str = "auto"


GPT2_SMALL = GPTConfig(
    vocab=50257, seq_len=1024, d_model=768, n_layers=12, n_heads=12, compute_dtype="bfloat16"
)


def gpt_init(key: jax.Array, cfg: GPTConfig) -> dict[str, Any]:
    """GPT parameters (float32); the layers are stacked along a leading axis."""
    d, L, f = cfg.d_model, cfg.n_layers, cfg.mlp_ratio * cfg.d_model
    ks = jax.random.split(key, 6)
    normal = lambda k, shape, std: std * jax.random.normal(k, shape, jnp.float32)
    proj_std = 0.02 / np.sqrt(2 * L)
    return {
        "embed": normal(ks[0], (cfg.vocab, d), 0.02),
        "pos": normal(ks[1], (cfg.seq_len, d), 0.01),
        "layers": {
            "ln1": jnp.ones((L, d), jnp.float32),
            "qkv": normal(ks[2], (L, d, 3 * d), 0.02),
            "out": normal(ks[3], (L, d, d), proj_std),
            "ln2": jnp.ones((L, d), jnp.float32),
            "fc": normal(ks[4], (L, d, f), 0.02),
            "proj": normal(ks[5], (L, f, d), proj_std),
        },
        "ln_f": jnp.ones((d,), jnp.float32),
    }


def _rms_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-6)
    return (y * scale).astype(x.dtype)


def gpt_logits(params: PyTree, tokens: jax.Array, cfg: GPTConfig) -> jax.Array:
    """Next-token logits (float32) for int32 ``tokens`` of shape (batch, time)."""
    dt = jnp.dtype(cfg.compute_dtype)
    b, t = tokens.shape
    h = (params["embed"][tokens] + params["pos"][:t]).astype(dt)
    nh, hd = cfg.n_heads, cfg.d_model // cfg.n_heads
    impl = None if cfg.attention in ("auto", "xla") else cfg.attention
    if cfg.attention == "auto" and jax.default_backend() == "gpu" and dt.itemsize == 2:
        impl = "cudnn"

    def layer(h: jax.Array, w: PyTree) -> tuple[jax.Array, None]:
        x = _rms_norm(h, w["ln1"])
        q, k, v = jnp.split(x @ w["qkv"].astype(dt), 3, axis=-1)
        q, k, v = (a.reshape(b, t, nh, hd) for a in (q, k, v))
        att = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
        att = att.reshape(b, t, -1)
        h = h + att @ w["out"].astype(dt)
        x = _rms_norm(h, w["ln2"])
        h = h + jax.nn.gelu(x @ w["fc"].astype(dt)) @ w["proj"].astype(dt)
        return h, None

    h, _ = jax.lax.scan(layer, h, params["layers"])
    h = _rms_norm(h, params["ln_f"])
    return (h @ params["embed"].astype(dt).T).astype(jnp.float32)


def gpt_loss(params: PyTree, tokens: jax.Array, cfg: GPTConfig) -> jax.Array:
    """Mean next-token cross-entropy; ``tokens`` has ``seq_len + 1`` columns."""
    logits = gpt_logits(params, tokens[:, :-1], cfg)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
