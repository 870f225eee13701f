"""`HybridConfig` and its groups: validation with errors that name the field (and the
closest valid one), frozen values, dict/JSON/TOML round trips, the monitor switch."""

import dataclasses

import pytest

import hybrid_jax as hj

INVALID = [
    ("warmup_steps", -1),
    ("full_steps", 0),
    ("correct_steps", 0),
    ("max_consecutive_predicts", 0),
    ("min_horizon", 0),
    ("max_horizon", 0),
    ("horizon_policy", "sometimes"),
    ("confidence_threshold", 1.5),
    ("confidence_threshold", float("nan")),
    ("predictor", "oracle"),
    ("observe_every", 0),
    ("observe_every", 2.0),
    ("monitor_every", -3),
    ("full_steps", 2.5),
    ("warmup_steps", True),
    ("predictor", 3),
    ("verify_tolerance", -0.1),
    ("horizon_shrink", 0.0),
    ("basis", {"size": 3}),
    ("monitor", "off"),
]

INVALID_IN_GROUPS = [
    (hj.BasisSettings, "size", 1),
    (hj.BasisSettings, "ema_decay", 1.0),
    (hj.BasisSettings, "dtype", "int8"),
    (hj.BasisSettings, "coef_groups", "layer"),
    (hj.BasisSettings, "fit_ridge", 0.0),
    (hj.BasisSettings, "sketch_stride", 1.5),
    (hj.RSSMSettings, "train_every", 0),
    (hj.RSSMSettings, "latent_classes", 1),
    (hj.RSSMSettings, "bootstrap", 0.0),
    (hj.MonitorSettings, "grad_vanish", 2.0),
    (hj.MonitorSettings, "loss_z_warning", 1.0),  # below loss_z_caution
    (hj.BanditSettings, "discount", 0.0),
    (hj.BanditSettings, "horizons", (2.5,)),
]


@pytest.mark.parametrize("field,value", INVALID)
def test_invalid_value_raises_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"HybridConfig\.{field}\b"):
        hj.HybridConfig(**{field: value})


@pytest.mark.parametrize("group,field,value", INVALID_IN_GROUPS)
def test_invalid_group_value_names_the_group_and_field(group, field, value):
    with pytest.raises(ValueError, match=rf"{group.__name__}\.{field}\b"):
        group(**{field: value})


def test_unknown_fields_name_the_closest_valid_one_or_the_group():
    with pytest.raises(
        ValueError, match=r"unknown field 'warmup_step'; did you mean 'warmup_steps'"
    ):
        hj.HybridConfig(warmup_step=3)
    with pytest.raises(ValueError, match=r"'rssm_hidden'; it is now rssm=hj\.RSSMSettings\(hidden"):
        hj.HybridConfig(rssm_hidden=32)
    with pytest.raises(
        ValueError, match=r"RSSMSettings: unknown field 'hiden'; did you mean 'hidden'"
    ):
        hj.RSSMSettings(hiden=32)
    with pytest.raises(ValueError, match="Valid fields: warmup_steps"):
        hj.HybridConfig(zzz=1)


def test_the_top_level_is_small_and_the_constants_left():
    names = [f.name for f in dataclasses.fields(hj.HybridConfig)]
    assert len(names) <= 20
    for gone in ("loss_ema_decay", "feature_ema_decay", "residual_buffer_size"):
        assert gone not in names


def test_cross_field_checks():
    with pytest.raises(ValueError, match=r"max_horizon.*min_horizon"):
        hj.HybridConfig(min_horizon=5, max_horizon=4)
    with pytest.raises(ValueError, match=r"HybridConfig\.bandit.*within \[min_horizon"):
        hj.HybridConfig(horizon_policy="bandit", max_horizon=3, bandit=hj.BanditSettings())


def test_config_is_frozen_and_replace_validates():
    cfg = hj.HybridConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.full_steps = 3
    assert cfg.replace(full_steps=3).full_steps == 3 and cfg.full_steps == 20
    with pytest.raises(ValueError, match=r"HybridConfig\.full_steps"):
        cfg.replace(full_steps=0)


def _custom():
    return hj.HybridConfig(
        warmup_steps=7,
        confidence_threshold=0.5,
        predictor="extrapolate",
        horizon_policy="confidence",
        basis=hj.BasisSettings(dtype="bfloat16", fit_ridge=1e-5),
        rssm=hj.RSSMSettings(hidden=32),
        monitor=None,
        bandit=hj.BanditSettings(horizons=(1, 3)),
    )


@pytest.mark.parametrize("fmt", ["dict", "json", "toml"])
def test_round_trips_keep_every_value(fmt):
    cfg = _custom()
    back = {
        "dict": lambda: hj.HybridConfig.from_dict(cfg.to_dict()),
        "json": lambda: hj.HybridConfig.from_json(cfg.to_json()),
        "toml": lambda: hj.HybridConfig.from_toml(cfg.to_toml()),
    }[fmt]()
    assert back == cfg
    assert back.monitor is None and back.bandit.horizons == (1, 3)
    assert back != hj.HybridConfig()


def test_toml_tables_and_file_loading(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('warmup_steps = 3\npredictor = "rssm"\n\n[rssm]\nhidden = 16\n')
    cfg = hj.HybridConfig.load(path)
    assert cfg.warmup_steps == 3 and cfg.rssm.hidden == 16 and cfg.rssm.members == 5
    (tmp_path / "h.toml").write_text("[hybrid]\nfull_steps = 4\n")
    assert hj.HybridConfig.load(tmp_path / "h.toml").full_steps == 4
    jpath = tmp_path / "c.json"
    jpath.write_text(cfg.to_json())
    assert hj.HybridConfig.load(jpath) == cfg


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda p: hj.HybridConfig.from_dict({"warmup_stepz": 3}), "warmup_steps"),
        (lambda p: hj.HybridConfig.from_json("{not json"), "invalid JSON"),
        (lambda p: hj.HybridConfig.from_toml("x = = 3"), "invalid TOML"),
        (lambda p: hj.HybridConfig.load(p / "missing.toml"), "no such config file"),
        (lambda p: hj.HybridConfig.from_dict([1, 2]), "expects a dict"),
    ],
)
def test_bad_sources_raise_value_error(tmp_path, make, match):
    with pytest.raises(ValueError, match=match):
        make(tmp_path)


def test_a_malformed_file_is_named_in_the_error(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("full_steps = = 3\n")
    with pytest.raises(ValueError, match=r"broken\.toml: HybridConfig: invalid TOML"):
        hj.HybridConfig.load(path)


def test_rollout_kernel_needs_power_of_two_sizes():
    assert hj.RSSMSettings(rollout_kernel=True).rollout_kernel
    with pytest.raises(ValueError, match=r"RSSMSettings\.rollout_kernel\b.*powers of two"):
        hj.RSSMSettings(rollout_kernel=True, hidden=100)
    with pytest.raises(ValueError, match=r"RSSMSettings\.rollout_kernel\b"):
        hj.RSSMSettings(rollout_kernel=True, hidden=8)
    with pytest.raises(ValueError, match=r"RSSMSettings\.rollout_kernel\b"):
        hj.RSSMSettings(rollout_kernel=True, latent_groups=3)
