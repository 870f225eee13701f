"""The settings groups of ``HybridConfig`` (basis, RSSM, monitor, bandit) and their
shared behaviour: keyword construction, validation, dict round trips."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Literal

from ._checks import check_type, plain, positive, require, unit, unknown

Predictors = Literal["last_update", "extrapolate", "rssm", "linefit", "snoo"]
HorizonPolicies = Literal["fixed", "confidence", "bandit"]
ScheduleSteps = Literal["global", "real"]
BasisDtypes = Literal["float32", "bfloat16", "params"]
CoefGroups = Literal["leaf", "global"]

# Constants nobody should need to tune (decays of running statistics, buffer sizes).
CONFIDENCE_EMA_DECAY = 0.8  # of the realised one-step accuracy
LOSS_EMA_DECAY = 0.9  # of the loss level and its trend
FEATURE_EMA_DECAY = 0.99  # of the encoder's feature statistics
CORRECTOR_FORGET = 0.99  # of the residual corrector's RLS
RESIDUAL_BUFFER_SIZE = 256  # records kept of predictions against reality


class _Settings:
    """Shared behaviour of the config groups: keyword construction with a clear error
    for unknown names, validation, dict round trips."""

    def __init__(self, **values: Any) -> None:
        names = [f.name for f in dataclasses.fields(self)]
        for key in values:
            if key not in names:
                raise ValueError(unknown(type(self).__name__, key, names, _group_fields()))
        for f in dataclasses.fields(self):
            value = values.get(f.name, f.default)
            if f.default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
                value = values.get(f.name, f.default_factory())
            object.__setattr__(self, f.name, value)
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            check_type(type(self).__name__, f.name, getattr(self, f.name), hints[f.name])
        self.validate()

    def validate(self) -> None:
        """Checks the values (overridden per group)."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        if not isinstance(d, dict):
            raise ValueError(f"{cls.__name__}.from_dict expects a dict; got {type(d).__name__}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def replace(self, **changes: Any) -> Any:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True, init=False)
class BasisSettings(_Settings):
    """The directions predicted updates are built from.

    Attributes:
      size: parameter-shaped directions kept from real updates (>= 2): the last real
        update, an EMA of real updates, then the older real updates.
      ema_decay: decay of the EMA of real updates, in [0, 1).
      dtype: storage: ``"float32"``, ``"bfloat16"`` or ``"params"`` (each leaf's own).
      coef_groups: ``"leaf"`` (coefficients per parameter leaf) or ``"global"``.
      fit_ridge: relative ridge of the least-squares fit onto the basis (> 0).
      sketch_stride: a real step's inner products read every this-many-th row of each
        leaf with that many rows (scaled up to the whole leaf); 1 reads everything. The
        gradient norm, and so the non-finite check, always reads every element.
      stride: real steps per direction (>= 1). With ``S > 1`` each direction is the
        displacement over ``S`` real steps (the sum of their updates, kept in one more
        parameter-sized buffer until it is pushed), the EMA starts from zero, and the
        basis is frozen during a Predict phase: a predictor gives each predicted step's
        update directly as coefficients over it (the trajectory predictors of
        ``hybrid_jax.predictors`` need this). Needs every real step observed
        (``observe_every <= 2``).
    """

    size: int = 2
    ema_decay: float = 0.9
    dtype: BasisDtypes = "float32"
    coef_groups: CoefGroups = "leaf"
    fit_ridge: float = 1e-6
    sketch_stride: int = 1
    stride: int = 1

    def validate(self) -> None:
        n = "BasisSettings"
        require(n, "size", self.size, self.size >= 2, "must be >= 2")
        unit(n, "ema_decay", self.ema_decay)
        positive(n, "fit_ridge", self.fit_ridge)
        require(n, "sketch_stride", self.sketch_stride, self.sketch_stride >= 1, "must be >= 1")
        require(n, "stride", self.stride, self.stride >= 1, "must be >= 1")


@dataclasses.dataclass(frozen=True, init=False)
class RSSMSettings(_Settings):
    """The RSSM ensemble predictor (``predictor="rssm"``).

    Attributes:
      members: ensemble members (>= 1).
      hidden: width of each member's GRU state (>= 1).
      latent_groups, latent_classes: the categorical latent (>= 1, >= 2).
      mlp: width of the prior, posterior, head and decoder MLPs (>= 1).
      window: real steps in the truncated-BPTT window (>= 2).
      learning_rate: Adam learning rate of the dynamics model (> 0).
      grad_clip: global-norm gradient clip (> 0).
      free_bits: free nats per latent categorical in the KL terms (>= 0).
      kl_dyn, kl_rep: weights of the two KL terms (>= 0).
      bootstrap: probability that a member trains on a given step, in (0, 1].
      calibration_forget: forgetting factor of the confidence calibration, in (0, 1].
      train_every: an optimizer step on every this-many-th observed real step (>= 1);
        the others only filter the window.
      rollout_kernel: on a GPU, each rollout step as one Pallas (Triton) kernel (needs
        ``hidden``, ``mlp``, ``latent_groups``, ``latent_classes`` powers of two,
        ``hidden >= 16``).
      seed: seed of the members' initialisation and sampling.
    """

    members: int = 5
    hidden: int = 256
    latent_groups: int = 4
    latent_classes: int = 8
    mlp: int = 128
    window: int = 16
    learning_rate: float = 1e-3
    grad_clip: float = 1.0
    free_bits: float = 1.0
    kl_dyn: float = 0.5
    kl_rep: float = 0.1
    bootstrap: float = 0.5
    calibration_forget: float = 0.99
    train_every: int = 1
    rollout_kernel: bool = False
    seed: int = 0

    def validate(self) -> None:
        n = "RSSMSettings"
        for name in ("members", "hidden", "latent_groups", "mlp", "train_every"):
            require(n, name, getattr(self, name), getattr(self, name) >= 1, "must be >= 1")
        require(n, "latent_classes", self.latent_classes, self.latent_classes >= 2, "must be >= 2")
        require(n, "window", self.window, self.window >= 2, "must be >= 2")
        positive(n, "learning_rate", self.learning_rate)
        positive(n, "grad_clip", self.grad_clip)
        for name in ("free_bits", "kl_dyn", "kl_rep"):
            x = getattr(self, name)
            require(n, name, x, math.isfinite(x) and x >= 0, "must be finite and >= 0")
        for name in ("bootstrap", "calibration_forget"):
            x = getattr(self, name)
            require(n, name, x, math.isfinite(x) and 0 < x <= 1, "must be in (0, 1]")
        if self.rollout_kernel:
            from ._rssm_kernel import supported

            sizes = (self.hidden, self.mlp, self.latent_groups, self.latent_classes)
            why = "needs hidden, mlp, latent_groups and latent_classes powers of two, hidden >= 16"
            require(n, "rollout_kernel", True, supported(*sizes), why)


@dataclasses.dataclass(frozen=True, init=False)
class MonitorSettings(_Settings):
    """The divergence monitor's thresholds (``hybrid_jax._monitor``).

    Attributes:
      loss_z_caution, loss_z_warning, loss_z_critical: loss z-scores, increasing.
      noise_floor: the z-score's std is at least this times the mean loss (> 0).
      grad_explode, grad_vanish: gradient norm over its baseline (> 1; in (0, 1)).
      pred_error_caution, pred_error_warning: relative loss-prediction errors.
      oscillation_window, oscillation_amplitude: alternating loss changes, each beyond
        this many noise scales (>= 2; > 0).
      ema_decay, var_decay: of the loss mean and of its variance, in [0, 1).
      escalate_after: consecutive steps at warning or above before escalating (>= 1).
      warmup: real observations before z-scores and gradient ratios alarm (>= 0).
    """

    loss_z_caution: float = 3.0
    loss_z_warning: float = 6.0
    loss_z_critical: float = 12.0
    noise_floor: float = 1e-3
    grad_explode: float = 10.0
    grad_vanish: float = 1e-3
    pred_error_caution: float = 0.5
    pred_error_warning: float = 2.0
    oscillation_window: int = 8
    oscillation_amplitude: float = 1.5
    ema_decay: float = 0.95
    var_decay: float = 0.99
    escalate_after: int = 3
    warmup: int = 20

    def validate(self) -> None:
        n = "MonitorSettings"
        for name in (
            "noise_floor",
            "oscillation_amplitude",
            "loss_z_caution",
            "pred_error_caution",
        ):
            positive(n, name, getattr(self, name))
        require(
            n,
            "loss_z_warning",
            self.loss_z_warning,
            self.loss_z_warning > self.loss_z_caution,
            "must be > loss_z_caution",
        )
        require(
            n,
            "loss_z_critical",
            self.loss_z_critical,
            self.loss_z_critical > self.loss_z_warning,
            "must be > loss_z_warning",
        )
        require(n, "grad_explode", self.grad_explode, self.grad_explode > 1, "must be > 1")
        require(n, "grad_vanish", self.grad_vanish, 0 < self.grad_vanish < 1, "must be in (0, 1)")
        require(
            n,
            "pred_error_warning",
            self.pred_error_warning,
            self.pred_error_warning >= self.pred_error_caution,
            "must be >= pred_error_caution",
        )
        require(
            n,
            "oscillation_window",
            self.oscillation_window,
            self.oscillation_window >= 2,
            "must be >= 2",
        )
        require(n, "escalate_after", self.escalate_after, self.escalate_after >= 1, "must be >= 1")
        require(n, "warmup", self.warmup, self.warmup >= 0, "must be >= 0")
        unit(n, "ema_decay", self.ema_decay)
        unit(n, "var_decay", self.var_decay)


@dataclasses.dataclass(frozen=True, init=False)
class BanditSettings(_Settings):
    """The LinUCB bandit over horizons (``horizon_policy="bandit"``).

    Attributes:
      horizons: the arms, within ``[min_horizon, max_horizon]``.
      alpha: width of the exploration bonus (>= 0).
      discount: discount per update, in (0, 1].
      ridge: ridge prior (> 0).
      predicted_step_cost, verify_cost: costs of a predicted step and of the
        verification forward pass, in real steps (> 0); the reward is verified progress
        (in units of the recent per-real-step progress) per unit of cost.
    """

    horizons: tuple[int, ...] = (1, 2, 3, 4)
    alpha: float = 1.0
    discount: float = 0.98
    ridge: float = 1.0
    predicted_step_cost: float = 0.03
    verify_cost: float = 0.35

    def validate(self) -> None:
        n = "BanditSettings"
        require(n, "horizons", self.horizons, len(self.horizons) >= 1, "must name a horizon")
        require(
            n, "alpha", self.alpha, math.isfinite(self.alpha) and self.alpha >= 0, "must be >= 0"
        )
        x = self.discount
        require(n, "discount", x, math.isfinite(x) and 0 < x <= 1, "must be in (0, 1]")
        for name in ("ridge", "predicted_step_cost", "verify_cost"):
            positive(n, name, getattr(self, name))


GROUPS = {
    "basis": BasisSettings,
    "rssm": RSSMSettings,
    "monitor": MonitorSettings,
    "bandit": BanditSettings,
}


def _group_fields() -> dict[str, list[str]]:
    """Each group's field names, then its class name (for error messages)."""
    return {k: [f.name for f in dataclasses.fields(g)] + [g.__name__] for k, g in GROUPS.items()}
