import json

import pytest

from kimi_linear.config import KIMI_LINEAR_48B_A3B, PRESETS, KimiLinearConfig


def test_published_config_round_trips_exactly(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(KIMI_LINEAR_48B_A3B))
    config = KimiLinearConfig.from_pretrained(tmp_path)
    out = tmp_path / "out"
    config.save_pretrained(out)
    assert json.loads((out / "config.json").read_text()) == KIMI_LINEAR_48B_A3B


def test_own_switch_is_written_only_when_set(tmp_path):
    """moe_weights_from_biased_scores is not in the released file: absent means the default (unbiased weights),
    and it is written back only when set."""
    assert "moe_weights_from_biased_scores" not in KimiLinearConfig.from_preset("test").to_dict()
    config = KimiLinearConfig.from_preset("test", moe_weights_from_biased_scores=True)
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["moe_weights_from_biased_scores"] is True
    assert KimiLinearConfig.from_pretrained(tmp_path).moe_weights_from_biased_scores is True
    with pytest.raises(ValueError, match="moe_weights_from_biased_scores"):
        KimiLinearConfig.from_preset("test", moe_weights_from_biased_scores="yes")


def test_unknown_keys_are_preserved(tmp_path):
    data = {**PRESETS["test"], "attn_res_block_size": 4, "some_future_field": {"a": [1, 2]}}
    config = KimiLinearConfig.from_dict(data)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["attn_res_block_size"] == 4 and saved["some_future_field"] == {"a": [1, 2]}
    assert KimiLinearConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()


def test_48b_layer_pattern_is_one_indexed():
    types = KimiLinearConfig.from_preset("kimi-linear-48b-a3b").layer_types
    assert [i for i, t in enumerate(types) if t == "mla"] == [3, 7, 11, 15, 19, 23, 26]
    assert types.count("kda") == 20


@pytest.mark.parametrize("preset", ["tiny", "test"])
def test_small_presets_are_hybrid_moe(preset):
    config = KimiLinearConfig.from_preset(preset)
    assert config.layer_types.count("mla") >= 1 and config.layer_types.count("kda") >= 3
    assert config.num_experts > 0 and config.num_shared_experts >= 1


def _with_lac(**changes):
    data = json.loads(json.dumps(PRESETS["test"]))
    data["linear_attn_config"].update(changes)
    return data


@pytest.mark.parametrize(
    "data, field",
    [
        (_with_lac(kda_layers=[1, 2, 3, 4]), "both"),
        (_with_lac(kda_layers=[1, 2]), "neither"),
        (_with_lac(full_attn_layers=[0]), "full_attn_layers"),
        ({**PRESETS["test"], "num_key_value_heads": 3}, "num_key_value_heads"),
        ({**PRESETS["test"], "hidden_act": "gelu"}, "hidden_act"),
        ({**PRESETS["test"], "hidden_size": -64}, "hidden_size"),
        ({**PRESETS["test"], "moe_intermediate_size": -1}, "moe_intermediate_size"),
        ({**PRESETS["test"], "num_experts_per_token": 9}, "num_experts_per_token"),
        (_with_lac(num_heads=0), "num_heads"),
        ({**PRESETS["test"], "moe_router_activation_func": "softmax"}, "moe_router_activation_func"),
    ],
)
def test_invalid_configs_name_the_field(data, field):
    with pytest.raises(ValueError, match=field):
        KimiLinearConfig.from_dict(data)


def test_malformed_json_and_missing_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        KimiLinearConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        KimiLinearConfig.from_pretrained(tmp_path / "nope")


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        KimiLinearConfig.from_preset("gpt-5")
