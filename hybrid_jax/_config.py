"""`HybridConfig`: every constant of the method, validated at construction."""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from pathlib import Path
from typing import Any

PREDICTORS = ("last_update", "extrapolate", "rssm")
HORIZON_POLICIES = ("fixed", "confidence", "bandit")
BASIS_DTYPES = ("float32", "bfloat16", "params")
COEF_GROUPS = ("leaf", "global")


@dataclasses.dataclass(frozen=True)
class HybridConfig:
    """Constants of the hybrid method. Frozen; validated on construction.

    Phase machine (one step = one call of ``hybrid_step`` or ``tx.update``)::

        Warmup(warmup_steps) -> Full(full_steps)
            -> [Predict(h) -> Correct(correct_steps)] x n -> Full ...

    A Predict phase starts at the end of a Full or Correct phase only when the
    predictor's confidence is at least ``confidence_threshold`` and fewer than
    ``max_consecutive_predicts`` Predict phases ran since the last Full phase;
    otherwise a Full phase follows. ``h`` is the horizon (see ``horizon_policy``).

    Attributes:
      warmup_steps: real steps before anything is learned from (>= 0).
      full_steps: real steps of a Full phase (>= 1).
      correct_steps: real steps after each Predict phase (>= 1).
      max_consecutive_predicts: Predict phases allowed between two Full phases (>= 1).
      min_horizon: shortest Predict phase (>= 1).
      max_horizon: longest Predict phase (>= min_horizon).
      horizon_policy: ``"fixed"`` (always ``max_horizon``), ``"confidence"`` (from
        ``min_horizon`` at the threshold to ``max_horizon`` at confidence 1) or
        ``"bandit"`` (a LinUCB bandit over ``bandit_horizons``). Every policy's horizon
        is multiplied by the monitor's shrink factor (see ``horizon_shrink``).
      confidence_threshold: smallest confidence, in [0, 1], that starts a Predict phase.
      predictor: ``"last_update"``, ``"extrapolate"`` or ``"rssm"`` (a custom
        ``Predictor`` can be passed to ``predictive`` instead).
      basis_size: parameter-shaped directions kept from real updates (>= 2): the
        last real update, an EMA of real updates, then the older real updates.
      basis_ema_decay: decay of the EMA of real updates, in [0, 1).
      basis_dtype: storage of the basis: ``"float32"``, ``"bfloat16"`` or
        ``"params"`` (each leaf's own dtype).
      coef_groups: ``"leaf"`` (coefficients per parameter leaf) or ``"global"``.
      fit_ridge: relative ridge of the least-squares fit onto the basis (> 0).
      sketch_stride: a real step's inner products (the update against the basis, the
        basis' Gram matrix, the update's and the optimizer moments' norms) read every
        ``sketch_stride``-th row of each parameter leaf that has at least that many
        rows (a leaf's rows: its shape as ``(-1, last axis)``), scaled up to the whole
        leaf; the least-squares targets and the features come from those rows. 1 (the
        default) reads every element. The gradient norm, and so the check for
        non-finite gradients, always reads every element.
      observe_every: of every this many real steps (>= 1), the hybrid observes two in a
        row (pushes them into the basis, fits them, encodes them, trains its predictor
        on them): a pair, so that one-step changes can still be learnt. The real steps
        between are the inner optimizer's step with the non-finite check, the loss
        statistics and the monitor only. A real step that verifies a Predict phase, or
        after which one may start (the phase ends and the last real step's confidence
        passes the threshold), is always observed; only observed steps start Predict
        phases, and with ``observe_every > 2`` they do so on the confidence of the real
        step before (as ``make_dispatched_step`` always does). 1 (the default) and 2
        observe every real step.
      confidence_ema_decay: decay of the running realised-accuracy statistic, in [0, 1).
      loss_ema_decay: decay of the running log-loss trend, in [0, 1).
      feature_ema_decay: decay of the encoder's running feature statistics, in [0, 1).
      monitor_every: during Predict, evaluate the loss (a forward pass, no backward)
        every this many predicted steps; 0 never does.
      rssm_members: ensemble members of the RSSM predictor (>= 1).
      rssm_hidden: width of each member's GRU state (>= 1).
      rssm_latent_groups, rssm_latent_classes: the categorical latent (>= 1, >= 2).
      rssm_mlp: width of the prior, posterior, head and decoder MLPs (>= 1).
      rssm_window: real steps in the truncated-BPTT window (>= 2).
      rssm_learning_rate: Adam learning rate of the dynamics model (> 0).
      rssm_grad_clip: global-norm gradient clip (> 0).
      rssm_free_bits: free nats per latent categorical in the KL terms (>= 0).
      rssm_kl_dyn, rssm_kl_rep: weights of the two KL terms (>= 0).
      rssm_bootstrap: probability that a member trains on a given step, in (0, 1].
      rssm_calibration_forget: forgetting factor of the confidence calibration, in (0, 1].
      rssm_train_every: the RSSM takes an optimizer step on every this-many-th real step
        it observes (>= 1); on the others it only filters its window (a forward pass),
        so that its rollout starts from the newest step.
      rssm_rollout_kernel: on a GPU, run each rollout step as one Pallas (Triton) kernel
        instead of XLA's six or seven kernels (needs ``rssm_hidden``, ``rssm_mlp``,
        ``rssm_latent_groups`` and ``rssm_latent_classes`` powers of two,
        ``rssm_hidden >= 16``). Off by default: JAX 0.11 deprecates the Pallas Triton
        backend (a warning per compile).
      rssm_seed: seed of the members' initialisation and sampling.
      verify_tolerance: a Predict phase is rolled back when, on the first real step
        after it, ``loss(new) > (1 + verify_tolerance) * loss(snapshot)`` (>= 0).
      correct_predictions: apply the residual corrector's affine correction to the
        predictor's coefficients and loss changes.
      corrector_forget: forgetting factor of the corrector's RLS, in (0, 1].
      residual_buffer_size: records kept in the residual ring buffer (>= 1).
      horizon_shrink: factor applied to the horizon scale at each monitor caution or
        worse, in (0, 1]; the scale doubles back (up to 1) at each accepted phase.
      bandit_horizons: the bandit's arms: horizons within [min_horizon, max_horizon]
        (checked when ``horizon_policy`` is ``"bandit"``).
      bandit_alpha: width of the bandit's exploration bonus (>= 0).
      bandit_discount: the bandit's discount per update, in (0, 1].
      bandit_ridge: the bandit's ridge prior (> 0).
      predicted_step_cost, verify_cost: costs of a predicted step and of the
        verification forward pass, in real steps (> 0); the bandit's reward is verified
        progress (in units of the recent per-real-step progress) per unit of cost.
      monitor_*: the divergence monitor's thresholds (``hybrid_jax._monitor``):
        loss z-scores for caution < warning < critical, the noise floor of the z-score,
        gradient explosion (> 1) and vanishing (< 1) ratios to the baseline, relative
        loss-prediction errors for caution <= warning, the oscillation window and
        amplitude, the EMA decays, consecutive warnings before escalation, and the real
        steps before statistical alarms.
    """

    warmup_steps: int = 100
    full_steps: int = 20
    correct_steps: int = 5
    max_consecutive_predicts: int = 5
    min_horizon: int = 1
    max_horizon: int = 15
    horizon_policy: str = "fixed"
    confidence_threshold: float = 0.85
    predictor: str = "last_update"
    basis_size: int = 2
    basis_ema_decay: float = 0.9
    basis_dtype: str = "float32"
    coef_groups: str = "leaf"
    fit_ridge: float = 1e-6
    sketch_stride: int = 1
    observe_every: int = 1
    confidence_ema_decay: float = 0.8
    loss_ema_decay: float = 0.9
    feature_ema_decay: float = 0.99
    monitor_every: int = 0
    rssm_members: int = 5
    rssm_hidden: int = 256
    rssm_latent_groups: int = 4
    rssm_latent_classes: int = 8
    rssm_mlp: int = 128
    rssm_window: int = 16
    rssm_learning_rate: float = 1e-3
    rssm_grad_clip: float = 1.0
    rssm_free_bits: float = 1.0
    rssm_kl_dyn: float = 0.5
    rssm_kl_rep: float = 0.1
    rssm_bootstrap: float = 0.5
    rssm_calibration_forget: float = 0.99
    rssm_train_every: int = 1
    rssm_rollout_kernel: bool = False
    rssm_seed: int = 0
    verify_tolerance: float = 0.02
    correct_predictions: bool = False
    corrector_forget: float = 0.99
    residual_buffer_size: int = 256
    horizon_shrink: float = 0.5
    bandit_horizons: tuple[int, ...] = (2, 4, 8, 15)
    bandit_alpha: float = 1.0
    bandit_discount: float = 0.98
    bandit_ridge: float = 1.0
    predicted_step_cost: float = 0.03
    verify_cost: float = 0.35
    monitor_loss_z_caution: float = 3.0
    monitor_loss_z_warning: float = 6.0
    monitor_loss_z_critical: float = 12.0
    monitor_noise_floor: float = 1e-3
    monitor_grad_explode: float = 10.0
    monitor_grad_vanish: float = 1e-3
    monitor_pred_error_caution: float = 0.5
    monitor_pred_error_warning: float = 2.0
    monitor_oscillation_window: int = 8
    monitor_oscillation_amplitude: float = 1.5
    monitor_ema_decay: float = 0.95
    monitor_var_decay: float = 0.99
    monitor_escalate_after: int = 3
    monitor_warmup: int = 20

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        v = self
        _require("warmup_steps", v.warmup_steps, v.warmup_steps >= 0, "must be >= 0")
        _require("full_steps", v.full_steps, v.full_steps >= 1, "must be >= 1")
        _require("correct_steps", v.correct_steps, v.correct_steps >= 1, "must be >= 1")
        _require(
            "max_consecutive_predicts",
            v.max_consecutive_predicts,
            v.max_consecutive_predicts >= 1,
            "must be >= 1",
        )
        _require("min_horizon", v.min_horizon, v.min_horizon >= 1, "must be >= 1")
        _require(
            "max_horizon",
            v.max_horizon,
            v.max_horizon >= v.min_horizon,
            f"must be >= min_horizon ({v.min_horizon})",
        )
        _one_of("horizon_policy", v.horizon_policy, HORIZON_POLICIES)
        _unit("confidence_threshold", v.confidence_threshold, closed_top=True)
        _one_of("predictor", v.predictor, PREDICTORS)
        _require("basis_size", v.basis_size, v.basis_size >= 2, "must be >= 2")
        _unit("basis_ema_decay", v.basis_ema_decay)
        _one_of("basis_dtype", v.basis_dtype, BASIS_DTYPES)
        _one_of("coef_groups", v.coef_groups, COEF_GROUPS)
        _positive("fit_ridge", v.fit_ridge)
        _require("sketch_stride", v.sketch_stride, v.sketch_stride >= 1, "must be >= 1")
        _require("observe_every", v.observe_every, v.observe_every >= 1, "must be >= 1")
        _unit("confidence_ema_decay", v.confidence_ema_decay)
        _unit("loss_ema_decay", v.loss_ema_decay)
        _unit("feature_ema_decay", v.feature_ema_decay)
        _require("monitor_every", v.monitor_every, v.monitor_every >= 0, "must be >= 0")
        for name in ("rssm_members", "rssm_hidden", "rssm_latent_groups", "rssm_mlp"):
            _require(name, getattr(v, name), getattr(v, name) >= 1, "must be >= 1")
        _require(
            "rssm_latent_classes", v.rssm_latent_classes, v.rssm_latent_classes >= 2, "must be >= 2"
        )
        _require("rssm_window", v.rssm_window, v.rssm_window >= 2, "must be >= 2")
        _require("rssm_train_every", v.rssm_train_every, v.rssm_train_every >= 1, "must be >= 1")
        for name in ("rssm_learning_rate", "rssm_grad_clip"):
            _positive(name, getattr(v, name))
        for name in ("rssm_free_bits", "rssm_kl_dyn", "rssm_kl_rep"):
            x = getattr(v, name)
            _require(name, x, math.isfinite(x) and x >= 0, "must be finite and >= 0")
        for name in ("rssm_bootstrap", "rssm_calibration_forget"):
            x = getattr(v, name)
            _require(name, x, math.isfinite(x) and 0 < x <= 1, "must be in (0, 1]")
        if v.rssm_rollout_kernel:
            from ._rssm_kernel import supported

            sizes = (v.rssm_hidden, v.rssm_mlp, v.rssm_latent_groups, v.rssm_latent_classes)
            _require(
                "rssm_rollout_kernel",
                True,
                supported(*sizes),
                "needs rssm_hidden, rssm_mlp, rssm_latent_groups and rssm_latent_classes "
                "powers of two, rssm_hidden >= 16",
            )
        _require(
            "verify_tolerance",
            v.verify_tolerance,
            math.isfinite(v.verify_tolerance) and v.verify_tolerance >= 0,
            "must be >= 0",
        )
        for name in ("corrector_forget", "horizon_shrink", "bandit_discount"):
            x = getattr(v, name)
            _require(name, x, math.isfinite(x) and 0 < x <= 1, "must be in (0, 1]")
        _require(
            "residual_buffer_size",
            v.residual_buffer_size,
            v.residual_buffer_size >= 1,
            "must be >= 1",
        )
        _require(
            "bandit_horizons",
            v.bandit_horizons,
            len(v.bandit_horizons) >= 1,
            "must name at least one horizon",
        )
        _require(
            "bandit_horizons",
            v.bandit_horizons,
            v.horizon_policy != "bandit"
            or all(v.min_horizon <= h <= v.max_horizon for h in v.bandit_horizons),
            f"must lie within [min_horizon, max_horizon] = [{v.min_horizon}, {v.max_horizon}]",
        )
        _require(
            "bandit_alpha",
            v.bandit_alpha,
            math.isfinite(v.bandit_alpha) and v.bandit_alpha >= 0,
            "must be >= 0",
        )
        for name in (
            "bandit_ridge",
            "predicted_step_cost",
            "verify_cost",
            "monitor_noise_floor",
            "monitor_oscillation_amplitude",
        ):
            _positive(name, getattr(v, name))
        _positive("monitor_loss_z_caution", v.monitor_loss_z_caution)
        _require(
            "monitor_loss_z_warning",
            v.monitor_loss_z_warning,
            v.monitor_loss_z_warning > v.monitor_loss_z_caution,
            "must be > monitor_loss_z_caution",
        )
        _require(
            "monitor_loss_z_critical",
            v.monitor_loss_z_critical,
            v.monitor_loss_z_critical > v.monitor_loss_z_warning,
            "must be > monitor_loss_z_warning",
        )
        _require(
            "monitor_grad_explode",
            v.monitor_grad_explode,
            v.monitor_grad_explode > 1,
            "must be > 1",
        )
        _require(
            "monitor_grad_vanish",
            v.monitor_grad_vanish,
            0 < v.monitor_grad_vanish < 1,
            "must be in (0, 1)",
        )
        _positive("monitor_pred_error_caution", v.monitor_pred_error_caution)
        _require(
            "monitor_pred_error_warning",
            v.monitor_pred_error_warning,
            v.monitor_pred_error_warning >= v.monitor_pred_error_caution,
            "must be >= monitor_pred_error_caution",
        )
        _require(
            "monitor_oscillation_window",
            v.monitor_oscillation_window,
            v.monitor_oscillation_window >= 2,
            "must be >= 2",
        )
        _require(
            "monitor_escalate_after",
            v.monitor_escalate_after,
            v.monitor_escalate_after >= 1,
            "must be >= 1",
        )
        _require("monitor_warmup", v.monitor_warmup, v.monitor_warmup >= 0, "must be >= 0")
        for name in ("monitor_ema_decay", "monitor_var_decay"):
            _unit(name, getattr(v, name))

    # -- serialisation -----------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Returns the fields as a plain ``dict`` (JSON and TOML friendly)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HybridConfig:
        """Builds a config from a ``dict``; unknown keys raise ``ValueError``."""
        if not isinstance(d, dict):
            raise ValueError(f"HybridConfig.from_dict expects a dict; got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"HybridConfig: unknown field(s) {unknown}; known: {sorted(known)}")
        tuples = {f.name for f in dataclasses.fields(cls) if str(f.type).startswith("tuple")}
        d = {k: tuple(x) if k in tuples and isinstance(x, list) else x for k, x in d.items()}
        return cls(**d)

    def to_json(self) -> str:
        """Returns the config as a JSON string."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> HybridConfig:
        """Parses a config from a JSON string."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"HybridConfig: invalid JSON: {e}") from None
        return cls.from_dict(d)

    def to_toml(self) -> str:
        """Returns the config as a TOML document (one ``key = value`` per field)."""
        return "".join(f"{k} = {_toml_value(x)}\n" for k, x in self.to_dict().items())

    @classmethod
    def from_toml(cls, text: str) -> HybridConfig:
        """Parses a config from a TOML document; a ``[hybrid]`` table is accepted too."""
        try:
            d = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"HybridConfig: invalid TOML: {e}") from None
        if set(d) == {"hybrid"} and isinstance(d["hybrid"], dict):
            d = d["hybrid"]
        return cls.from_dict(d)

    @classmethod
    def load(cls, path: str | Path) -> HybridConfig:
        """Reads a config from a ``.json`` or ``.toml`` file."""
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"HybridConfig: no such config file: {p}")
        text = p.read_text()
        if p.suffix == ".json":
            return cls.from_json(text)
        if p.suffix == ".toml":
            return cls.from_toml(text)
        raise ValueError(f"HybridConfig: config file must end in .json or .toml; got {p.name}")

    def replace(self, **changes: Any) -> HybridConfig:
        """Returns a copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)


def _require(name: str, value: Any, ok: bool, why: str) -> None:
    if not ok:
        raise ValueError(f"HybridConfig.{name} {why}; got {value!r}")


def _positive(name: str, value: float) -> None:
    _require(name, value, math.isfinite(value) and value > 0, "must be finite and > 0")


def _unit(name: str, value: float, closed_top: bool = False) -> None:
    top_ok = value <= 1.0 if closed_top else value < 1.0
    interval = "[0, 1]" if closed_top else "[0, 1)"
    _require(
        name, value, math.isfinite(value) and value >= 0.0 and top_ok, f"must be in {interval}"
    )


def _one_of(name: str, value: str, choices: tuple[str, ...]) -> None:
    _require(name, value, value in choices, f"must be one of {choices}")


def _check_type(name: str, value: Any, annotation: Any) -> None:
    if str(annotation) == "tuple[int, ...]":
        ok = isinstance(value, tuple) and all(
            isinstance(x, int) and not isinstance(x, bool) for x in value
        )
        if not ok:
            raise ValueError(f"HybridConfig.{name} must be a tuple of ints; got {value!r}")
        return
    kind = {"int": int, "float": float, "str": str, "bool": bool}[str(annotation)]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return  # ints are fine where floats are expected
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise ValueError(f"HybridConfig.{name} must be a {kind.__name__}; got {value!r}")


def _toml_value(x: Any) -> str:
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, (int, float)):
        return repr(x)
    if isinstance(x, str):
        return json.dumps(x)
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(_toml_value(e) for e in x) + "]"
    raise TypeError(f"cannot write {type(x).__name__} as TOML")
