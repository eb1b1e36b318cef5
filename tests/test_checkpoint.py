import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kimi_linear import KimiLinearConfig, KimiLinearForCausalLM
from kimi_linear.checkpoint import CheckpointError


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return KimiLinearForCausalLM(KimiLinearConfig.from_preset("test"))


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


def test_round_trip_single_file_is_bit_exact(tmp_path, model):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / "model.safetensors.index.json").exists()
    _assert_same_state(model, KimiLinearForCausalLM.from_pretrained(tmp_path))


def test_round_trip_sharded_is_bit_exact(tmp_path, model):
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0].endswith(f"-of-{len(shards):05d}.safetensors")
    assert not list(tmp_path.glob("*.tmp"))
    _assert_same_state(model, KimiLinearForCausalLM.from_pretrained(tmp_path))


def test_saved_names_are_the_released_layout(tmp_path, model):
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    c = model.config
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names
    assert "model.layers.0.mlp.gate_proj.weight" in names
    moe = "model.layers.1.block_sparse_moe"
    assert {f"{moe}.experts.{c.num_experts - 1}.{w}.weight" for w in ("w1", "w2", "w3")} <= names
    assert {f"{moe}.gate.weight", f"{moe}.gate.e_score_correction_bias"} <= names
    kda = "model.layers.0.self_attn"
    for t in ("q_conv1d.weight", "A_log", "dt_bias", "f_a_proj.weight", "f_b_proj.weight", "b_proj.weight",
              "g_a_proj.weight", "g_b_proj.weight", "o_norm.weight"):
        assert f"{kda}.{t}" in names
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.get_slice(f"{kda}.A_log").get_shape() == [1, 1, c.kda_num_heads, 1]
        assert f.get_slice(f"{kda}.q_conv1d.weight").get_shape() == [c.kda_num_heads * c.kda_head_dim, 1, 4]
    mla = f"model.layers.{c.layer_types.index('mla')}.self_attn"
    assert {f"{mla}.{t}.weight" for t in ("q_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj",
                                          "o_proj")} <= names
    assert not any("gate_up_proj" in n for n in names)


def test_load_casts_dtype_but_keeps_fp32_tensors(tmp_path, model):
    model.save_pretrained(tmp_path)
    loaded = KimiLinearForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    attn = loaded.model.layers[0].self_attn
    assert attn.A_log.dtype == torch.float32 and attn.dt_bias.dtype == torch.float32
    assert loaded.moe_layers()[0].gate.e_score_correction_bias.dtype == torch.float32


def test_bad_checkpoint_lists_every_problem(tmp_path, model):
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.norm.weight"]
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    tensors["model.layers.0.self_attn.surprise"] = torch.zeros(3)
    tensors["lm_head.weight"] = torch.zeros(5, 5)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        KimiLinearForCausalLM.from_pretrained(tmp_path)
    message = str(err.value)
    for expected in ("missing (2)", "model.norm.weight", "experts.2.w3.weight", "unexpected (1)",
                     "self_attn.surprise", "wrong shape (1)", "lm_head.weight"):
        assert expected in message


def test_transformers_dense_mlp_name_is_accepted(tmp_path, model):
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    for w in ("gate_proj", "up_proj", "down_proj"):
        tensors[f"model.layers.0.block_sparse_moe.{w}.weight"] = tensors.pop(f"model.layers.0.mlp.{w}.weight")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    _assert_same_state(model, KimiLinearForCausalLM.from_pretrained(tmp_path))


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        KimiLinearForCausalLM.from_pretrained(tmp_path / "absent")
    KimiLinearConfig.from_preset("test").save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        KimiLinearForCausalLM.from_pretrained(tmp_path)


def test_48b_builds_on_meta_without_allocating():
    with torch.device("meta"):
        model = KimiLinearForCausalLM(KimiLinearConfig.from_preset("kimi-linear-48b-a3b"))
    assert all(p.is_meta for p in model.parameters())
    assert model.num_parameters() == 49_122_681_728
    assert 3.0e9 < model.num_activated_parameters() < 3.2e9
