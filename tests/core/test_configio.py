"""Presets, YAML files, dotted overrides and one-line config errors."""

from __future__ import annotations

import pytest
from k2_core import ConfigError, RunConfig
from k2_core.configio import apply_overrides, dump_config, load_config, parse_value, preset_names
from pydantic import ValidationError


def test_presets_ship_and_validate():
    assert {"tiny", "small", "k2-1t", "deepseek-v3"} <= set(preset_names())
    for name in preset_names():
        cfg = load_config(name)
        assert isinstance(cfg, RunConfig) and cfg.name == name


def test_k2_preset_is_the_published_config():
    m = load_config("k2-1t")
    assert (m.model.num_hidden_layers, m.model.hidden_size, m.model.num_attention_heads) == (
        61,
        7168,
        64,
    )
    assert (m.moe.n_routed_experts, m.moe.num_experts_per_tok, m.moe.routed_scaling_factor) == (
        384,
        8,
        2.827,
    )
    assert m.model.rope_scaling.factor == 32 and m.model.rope_theta == 50000


def test_overrides_and_types():
    cfg = load_config("tiny", ["optim.lr=3e-3", "moe.n_routed_experts=32", "train.bf16=true"])
    assert cfg.optim.lr == pytest.approx(3e-3) and cfg.moe.n_routed_experts == 32 and cfg.train.bf16
    assert (
        parse_value("3e-3") == 3e-3
        and parse_value("null") is None
        and parse_value("[1,2]") == [1, 2]
    )
    assert apply_overrides({"a": {"b": 1}}, ["a.c.d=x"]) == {"a": {"b": 1, "c": {"d": "x"}}}


def test_config_is_frozen():
    cfg = load_config("tiny")
    with pytest.raises(ValidationError, match="frozen"):
        cfg.optim.lr = 1.0  # type: ignore[misc]


def test_yaml_file_with_base(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("base: tiny\noptim:\n  lr: 0.01\n")
    cfg = load_config(str(f))
    assert cfg.optim.lr == 0.01 and cfg.model.hidden_size == 256
    assert RunConfig.model_validate_json(dump_config(cfg, "json")) == cfg


@pytest.mark.parametrize(
    "spec, overrides, message",
    [
        ("tiny", ["optim.lr=-1"], "optim.lr: must be > 0 (got -1)"),
        ("tiny", ["optim.lr=fast"], "optim.lr: must be a number (got 'fast')"),
        (
            "tiny",
            ["moe.num_experts_per_tok=20"],
            "moe.num_experts_per_tok: must be <= n_routed_experts (16), got 20",
        ),
        (
            "tiny",
            ["model.no_such_field=3"],
            "model.no_such_field: unknown key; valid keys: vocab_size",
        ),
        ("tiny", ["bogus.x=1"], "bogus: unknown key; valid keys: name, model"),
        (
            "tiny",
            ["model.num_key_value_heads=3"],
            "model.num_key_value_heads: must divide num_attention_heads (8), got 3",
        ),
        ("tiny", ["moe.n_group=3"], "moe.n_group: must divide n_routed_experts (16), got 3"),
        ("tiny", ["moe.router=nope"], "moe.router: no router named 'nope'; available:"),
        ("tiny", ["optim.name=sgd9"], "optim.name: no optimizer named 'sgd9'; available: adamw"),
        ("tiny", ["optim.options.betas=7"], "optim.options.betas"),
        ("tiny", ["plugins.nosuch.x=1"], "plugins.nosuch: no plugin owns this section"),
        ("no-such-preset", [], "no preset or file named 'no-such-preset'; presets:"),
        ("/nonexistent/x.yaml", [], "/nonexistent/x.yaml: no such file"),
        ("tiny", ["novalue"], "override 'novalue': expected dotted.key=value"),
    ],
)
def test_bad_input_one_line(spec, overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(spec, overrides)
    text = str(e.value)
    assert text.startswith("config error: ") and "\n" not in text
    assert message in text


def test_malformed_yaml(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: malformed YAML at line \d+"):
        load_config(str(f))


def test_memory_uri(tmp_path):
    import fsspec

    with fsspec.open("memory://cfg/run.yaml", "w") as f:
        f.write("base: tiny\ntrain:\n  steps: 5\n")
    assert load_config("memory://cfg/run.yaml").train.steps == 5


@pytest.mark.parametrize("text", ["", "train: {steps: 3}\n"])
def test_a_yaml_without_base_extends_tiny_not_k2_1t(tmp_path, text):
    f = tmp_path / "run.yaml"
    f.write_text(text)
    cfg = load_config(str(f))
    tiny = load_config("tiny")
    assert cfg.model == tiny.model and cfg.moe == tiny.moe  # never the 1T default
    if text:
        assert cfg.train.steps == 3
