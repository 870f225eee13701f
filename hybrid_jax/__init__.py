"""hybrid_jax: training that replaces part of its gradient steps with predicted updates.

A real step runs forward, backward and the wrapped optax optimizer; a predicted step
applies an update predicted from the directions of recent real updates, with no
backward pass. A phase machine on the device chooses between them inside one
``jax.lax.cond``, so a whole run compiles once.

    import hybrid_jax as hj
    tx = hj.predictive(optax.adamw(1e-3), hj.HybridConfig())
    state = tx.init(params)
    step = hj.make_hybrid_step(loss_fn, tx)
    params, state, metrics = step(params, state, batch)
"""

from . import _report as report
from ._bandit import BanditState
from ._basis import Basis
from ._checkpoint import Checkpointer
from ._config import HybridConfig
from ._dispatch import DispatchedStep, make_dispatched_step
from ._memory import MemoryMonitor
from ._metrics import METRIC_NAMES, metrics
from ._monitor import EVENT_NAMES, LEVEL_NAMES, MonitorSettings, MonitorState
from ._phases import CORRECT, FULL, PHASE_NAMES, PREDICT, WARMUP
from ._predictors import (
    Observation,
    PredictContext,
    Prediction,
    Predictor,
    PredictorSpec,
    extrapolate,
    last_update,
)
from ._residuals import Corrector, ResidualBuffer
from ._rssm import RSSMSettings, RSSMState, rssm
from ._sharding import (
    batch_sharding,
    data_mesh,
    make_sharded_hybrid_step,
    param_shardings,
    state_shardings,
)
from ._state import Counters, HybridState, Stats, StepInfo
from ._step import hybrid_step, make_hybrid_step
from ._train import TrainResult, make_train_step, train
from ._transform import PredictiveTransformation, force_full, predictive

__version__ = "0.1.0"

__all__ = [
    "CORRECT",
    "EVENT_NAMES",
    "FULL",
    "LEVEL_NAMES",
    "METRIC_NAMES",
    "PHASE_NAMES",
    "PREDICT",
    "WARMUP",
    "BanditState",
    "Basis",
    "Checkpointer",
    "Corrector",
    "Counters",
    "DispatchedStep",
    "HybridConfig",
    "HybridState",
    "MemoryMonitor",
    "MonitorSettings",
    "MonitorState",
    "Observation",
    "PredictContext",
    "Prediction",
    "PredictiveTransformation",
    "Predictor",
    "PredictorSpec",
    "RSSMSettings",
    "RSSMState",
    "ResidualBuffer",
    "Stats",
    "StepInfo",
    "TrainResult",
    "batch_sharding",
    "data_mesh",
    "extrapolate",
    "force_full",
    "hybrid_step",
    "last_update",
    "make_dispatched_step",
    "make_hybrid_step",
    "make_sharded_hybrid_step",
    "make_train_step",
    "metrics",
    "param_shardings",
    "predictive",
    "report",
    "rssm",
    "state_shardings",
    "train",
]
