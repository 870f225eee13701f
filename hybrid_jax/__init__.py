"""hybrid_jax: training that replaces part of its gradient steps with predicted updates.

A real step runs forward, backward and the wrapped optax optimizer; a predicted step
applies an update predicted from the directions of recent real updates, with no
backward pass. A phase machine on the device decides which kind of step comes next,
so a whole run compiles once.

    import hybrid_jax as hj
    tx = hj.predictive(optax.adamw(1e-3), hj.HybridConfig())
    state = tx.init(params)
    step = hj.make_dispatched_step(loss_fn, tx)   # or hj.make_hybrid_step: same steps
    params, state, metrics = step(params, state, batch)

Submodules: ``hybrid_jax.config`` (the config and its groups), ``hybrid_jax.report``
(export, summaries, plots), ``hybrid_jax.sharding`` (the step over a device mesh),
``hybrid_jax.tasks`` (the offline real tasks of the tests and benchmarks),
``hybrid_jax.predictors`` (the built-in and trajectory predictors).
"""

from . import _report as report  # noqa: F401  (hj.report)
from ._checkpoint import Checkpointer
from ._dispatch import make_dispatched_step
from ._memory import MemoryMonitor
from ._metrics import METRIC_NAMES, metrics
from ._nonfinite import NonfiniteWarning
from ._phases import CORRECT, FULL, PREDICT, WARMUP
from ._phases import PHASE_NAMES as PHASE_NAMES
from ._predictors import (
    Observation,
    PredictContext,
    Prediction,
    Predictor,
    PredictorSpec,
)
from ._predictors import (
    extrapolate as extrapolate,  # also in hybrid_jax.predictors
)
from ._predictors import (
    last_update as last_update,
)
from ._rssm import rssm
from ._state import HybridState
from ._step import hybrid_step, make_hybrid_step
from ._train import TrainResult, train
from ._transform import force_full, predictive
from .config import BanditSettings, BasisSettings, HybridConfig, MonitorSettings, RSSMSettings

__version__ = "0.2.0"

# Phase codes of the ``phase`` metric (``PHASE_NAMES[code]``), also importable here.
_PHASE_CODES = (WARMUP, FULL, PREDICT, CORRECT)

__all__ = [
    "METRIC_NAMES",
    "BanditSettings",
    "BasisSettings",
    "Checkpointer",
    "HybridConfig",
    "HybridState",
    "MemoryMonitor",
    "MonitorSettings",
    "NonfiniteWarning",
    "Observation",
    "PredictContext",
    "Prediction",
    "Predictor",
    "PredictorSpec",
    "RSSMSettings",
    "TrainResult",
    "force_full",
    "hybrid_step",
    "make_dispatched_step",
    "make_hybrid_step",
    "metrics",
    "predictive",
    "rssm",
    "train",
]
