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
    ("basis_size", 1),
    ("basis_ema_decay", 1.0),
    ("basis_dtype", "int8"),
    ("coef_groups", "layer"),
    ("fit_ridge", 0.0),
    ("sketch_stride", 0),
    ("observe_every", 0),
    ("observe_every", 2.0),
    ("rssm_train_every", 0),
    ("sketch_stride", 1.5),
    ("confidence_ema_decay", -0.1),
    ("loss_ema_decay", 2.0),
    ("monitor_every", -3),
    ("full_steps", 2.5),
    ("warmup_steps", True),
    ("predictor", 3),
]


@pytest.mark.parametrize("field,value", INVALID)
def test_invalid_value_raises_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"HybridConfig\.{field}\b"):
        hj.HybridConfig(**{field: value})


def test_at_least_ten_distinct_fields_are_validated():
    assert len({f for f, _ in INVALID}) >= 10


def test_cross_field_horizon_bounds():
    with pytest.raises(ValueError, match=r"max_horizon.*min_horizon"):
        hj.HybridConfig(min_horizon=5, max_horizon=4)


def test_config_is_frozen():
    cfg = hj.HybridConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.full_steps = 3


def _custom():
    return hj.HybridConfig(
        warmup_steps=7,
        confidence_threshold=0.5,
        predictor="extrapolate",
        basis_dtype="bfloat16",
        fit_ridge=1e-5,
        horizon_policy="confidence",
    )


def test_dict_round_trip():
    cfg = _custom()
    assert hj.HybridConfig.from_dict(cfg.to_dict()) == cfg


def test_json_round_trip():
    cfg = _custom()
    assert hj.HybridConfig.from_json(cfg.to_json()) == cfg


def test_toml_round_trip():
    cfg = _custom()
    assert hj.HybridConfig.from_toml(cfg.to_toml()) == cfg


def test_toml_hybrid_table_and_file_loading(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[hybrid]\nwarmup_steps = 3\npredictor = "extrapolate"\n')
    cfg = hj.HybridConfig.load(path)
    assert cfg.warmup_steps == 3 and cfg.predictor == "extrapolate"
    jpath = tmp_path / "c.json"
    jpath.write_text(cfg.to_json())
    assert hj.HybridConfig.load(jpath) == cfg


@pytest.mark.parametrize(
    "make",
    [
        lambda p: hj.HybridConfig.from_dict({"warmup_stepz": 3}),
        lambda p: hj.HybridConfig.from_json("{not json"),
        lambda p: hj.HybridConfig.from_toml("x = = 3"),
        lambda p: hj.HybridConfig.load(p / "missing.toml"),
        lambda p: hj.HybridConfig.from_dict([1, 2]),
    ],
)
def test_bad_sources_raise_value_error(tmp_path, make):
    with pytest.raises(ValueError, match="HybridConfig"):
        make(tmp_path)


def test_rollout_kernel_needs_power_of_two_sizes():
    assert hj.HybridConfig(predictor="rssm", rssm_rollout_kernel=True).rssm_rollout_kernel
    with pytest.raises(ValueError, match=r"HybridConfig\.rssm_rollout_kernel\b.*powers of two"):
        hj.HybridConfig(rssm_rollout_kernel=True, rssm_hidden=100)
    with pytest.raises(ValueError, match=r"HybridConfig\.rssm_rollout_kernel\b"):
        hj.HybridConfig(rssm_rollout_kernel=True, rssm_hidden=8)
    with pytest.raises(ValueError, match=r"HybridConfig\.rssm_rollout_kernel\b"):
        hj.HybridConfig(rssm_rollout_kernel=True, rssm_latent_groups=3)
