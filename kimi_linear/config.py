"""Model configuration: one dataclass that reads and writes the published ``config.json``.

Design choices:
- Field names are the ones of the released ``config.json`` (not transformers' renamed attributes), so a
  file loads, validates and saves back unchanged. Keys we do not know are kept in ``extra`` and written back.
- ``linear_attn_config`` stays the nested dict of the file, with its 1-indexed layer lists; the 0-indexed
  view the code uses is derived (``layer_types``) rather than stored twice.
- Presets are plain dicts in the file format, so a preset *is* a valid ``config.json``.
- Fields that the released file lacks (``OPTIONAL_FIELDS``: our own switch, AttnRes) are written only when they
  differ from their default, so that file still round-trips exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

ACTIVATIONS = ("silu",)
# Fields the released config.json does not have (our switch, and newer Kimi configs' AttnRes): to_dict writes them
# only when they differ from their defaults, so older files round-trip unchanged.
OPTIONAL_FIELDS = ("moe_weights_from_biased_scores", "attn_res_block_size")
ROUTER_ACTIVATIONS = ("sigmoid",)


@dataclass
class KimiLinearConfig:
    vocab_size: int = 163840
    hidden_size: int = 2304
    num_hidden_layers: int = 27
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = 72
    hidden_act: str = "silu"
    intermediate_size: int = 9216
    moe_intermediate_size: int = 1024
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    mla_use_nope: bool = True
    linear_attn_config: dict[str, Any] = field(
        default_factory=lambda: {
            "kda_layers": [i for i in range(1, 27) if i % 4 != 0],
            "full_attn_layers": [4, 8, 12, 16, 20, 24, 27],
            "num_heads": 32,
            "head_dim": 128,
            "short_conv_kernel_size": 4,
        }
    )
    num_experts: int = 256
    num_experts_per_token: int = 8
    num_shared_experts: int = 1
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    routed_scaling_factor: float = 2.446
    moe_router_activation_func: str = "sigmoid"
    use_grouped_topk: bool = True
    num_expert_group: int = 1
    topk_group: int = 1
    moe_renormalize: bool = True
    # Our switch, not in the released config.json: route with the weights of the model's remote code, gathered from
    # sigmoid scores + correction bias, instead of the unbiased scores of vLLM, SGLang and transformers (the
    # default; see architecture.md, MoE, and kimi_linear.ops.moe.route).
    moe_weights_from_biased_scores: bool = False
    num_nextn_predict_layers: int = 0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    model_max_length: int = 1048576
    initializer_range: float = 0.02
    bos_token_id: int | None = 163584
    eos_token_id: int | list[int] | None = 163586
    pad_token_id: int | None = 163839
    use_cache: bool = True
    model_type: str = "kimi_linear"
    architectures: list[str] = field(default_factory=lambda: ["KimiLinearForCausalLM"])
    dtype: str = "bfloat16"
    # Block Attention Residuals (attnres.md): sublayers per block; None = the standard residual, 1 = Full AttnRes.
    attn_res_block_size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.linear_attn_config = dict(self.linear_attn_config)
        self.validate()

    # ----------------------------------------------------------------------------------------------------------
    # Derived views
    @property
    def layer_types(self) -> list[str]:
        """0-indexed ``"kda"`` / ``"mla"`` per layer, from the 1-indexed lists of ``linear_attn_config``."""
        mla = set(self.linear_attn_config["full_attn_layers"])
        return ["mla" if i + 1 in mla else "kda" for i in range(self.num_hidden_layers)]

    def is_moe_layer(self, i: int) -> bool:
        return self.num_experts > 0 and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    @property
    def kda_num_heads(self) -> int:
        return int(self.linear_attn_config["num_heads"])

    @property
    def kda_head_dim(self) -> int:
        return int(self.linear_attn_config["head_dim"])

    @property
    def conv_kernel_size(self) -> int:
        return int(self.linear_attn_config.get("short_conv_kernel_size", 4))

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    # ----------------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending field for configurations the model cannot build."""
        positive = [
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "kv_lora_rank", "qk_nope_head_dim", "v_head_dim", "intermediate_size",
        ]
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        non_negative = [
            "qk_rope_head_dim", "moe_intermediate_size", "num_experts", "num_experts_per_token",
            "num_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers",
        ]
        for name in non_negative:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        if self.q_lora_rank is not None:
            raise ValueError("q_lora_rank must be null: the Kimi Linear MLA uses a plain q_proj")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}")
        if self.moe_router_activation_func not in ROUTER_ACTIVATIONS:
            raise ValueError(
                f"moe_router_activation_func must be one of {ROUTER_ACTIVATIONS}, "
                f"got {self.moe_router_activation_func!r}"
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if not self.mla_use_nope:
            raise ValueError("mla_use_nope must be true: Kimi Linear has no positional encoding")
        block = self.attn_res_block_size
        if block is not None and (not isinstance(block, int) or block <= 0):
            raise ValueError(f"attn_res_block_size must be a positive integer or null, got {block!r}")
        if not isinstance(self.moe_weights_from_biased_scores, bool):
            raise ValueError(f"moe_weights_from_biased_scores must be true or false, got "
                             f"{self.moe_weights_from_biased_scores!r}")
        if self.moe_layer_freq <= 0:
            raise ValueError(f"moe_layer_freq must be a positive integer, got {self.moe_layer_freq}")
        self._validate_linear_attn_config()
        if self.num_experts > 0:
            if not 0 < self.num_experts_per_token <= self.num_experts:
                raise ValueError(
                    f"num_experts_per_token must be in 1..num_experts ({self.num_experts}), "
                    f"got {self.num_experts_per_token}"
                )
            if self.moe_intermediate_size <= 0:
                raise ValueError(f"moe_intermediate_size must be positive, got {self.moe_intermediate_size}")
            if self.num_expert_group <= 0 or self.num_experts % self.num_expert_group:
                raise ValueError(
                    f"num_expert_group ({self.num_expert_group}) must divide num_experts ({self.num_experts})"
                )
            if not 0 < self.topk_group <= self.num_expert_group:
                raise ValueError(f"topk_group must be in 1..num_expert_group, got {self.topk_group}")

    def _validate_linear_attn_config(self) -> None:
        lac = self.linear_attn_config
        for key in ("kda_layers", "full_attn_layers", "num_heads", "head_dim"):
            if key not in lac:
                raise ValueError(f"linear_attn_config.{key} is missing")
        for key in ("num_heads", "head_dim", "short_conv_kernel_size"):
            value = lac.get(key, 4)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"linear_attn_config.{key} must be a positive integer, got {value!r}")
        kda, mla = lac["kda_layers"], lac["full_attn_layers"]
        for key, layers in (("kda_layers", kda), ("full_attn_layers", mla)):
            bad = [i for i in layers if not isinstance(i, int) or not 1 <= i <= self.num_hidden_layers]
            if bad:
                raise ValueError(
                    f"linear_attn_config.{key} holds {bad}: layers are 1-indexed in 1..{self.num_hidden_layers}"
                )
            if len(set(layers)) != len(layers):
                raise ValueError(f"linear_attn_config.{key} lists a layer twice")
        both = sorted(set(kda) & set(mla))
        if both:
            raise ValueError(f"linear_attn_config: layers {both} are in both kda_layers and full_attn_layers")
        neither = sorted(set(range(1, self.num_hidden_layers + 1)) - set(kda) - set(mla))
        if neither:
            raise ValueError(f"linear_attn_config: layers {neither} are in neither kda_layers nor full_attn_layers")

    # ----------------------------------------------------------------------------------------------------------
    # File format
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KimiLinearConfig:
        if not isinstance(data, dict):
            raise ValueError(f"a config must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: copy.deepcopy(v) for k, v in data.items() if k in names}
        extra = {k: copy.deepcopy(v) for k, v in data.items() if k not in names}
        if "torch_dtype" in extra and "dtype" not in known:
            known["dtype"] = extra["torch_dtype"]
        try:
            return cls(**known, extra=extra)
        except TypeError as e:  # a field of the wrong JSON type
            raise ValueError(f"invalid config: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        fields = [f for f in dataclasses.fields(self) if f.name != "extra"]
        data = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields
                if f.name not in OPTIONAL_FIELDS or getattr(self, f.name) != f.default}
        data.update(copy.deepcopy(self.extra))
        return data

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> KimiLinearConfig:
        """Read ``config.json`` from a directory (or the file itself)."""
        path = os.fspath(path)
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            with open(file, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file} is not valid JSON: {e}") from e
        return cls.from_dict(data)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> KimiLinearConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        data = copy.deepcopy(PRESETS[name])
        data.update(overrides)
        return cls.from_dict(data)


# The released Kimi-Linear-48B-A3B config.json, every field.
KIMI_LINEAR_48B_A3B: dict[str, Any] = {
    "architectures": ["KimiLinearForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_kimi.KimiLinearConfig",
        "AutoModel": "modeling_kimi.KimiLinearModel",
        "AutoModelForCausalLM": "modeling_kimi.KimiLinearForCausalLM",
    },
    "bos_token_id": 163584,
    "dtype": "bfloat16",
    "eos_token_id": 163586,
    "first_k_dense_replace": 1,
    "head_dim": 72,
    "hidden_act": "silu",
    "hidden_size": 2304,
    "initializer_range": 0.02,
    "intermediate_size": 9216,
    "kv_lora_rank": 512,
    "linear_attn_config": {
        "full_attn_layers": [4, 8, 12, 16, 20, 24, 27],
        "head_dim": 128,
        "kda_layers": [1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23, 25, 26],
        "num_heads": 32,
        "short_conv_kernel_size": 4,
    },
    "mla_use_nope": True,
    "model_max_length": 1048576,
    "model_type": "kimi_linear",
    "moe_intermediate_size": 1024,
    "moe_layer_freq": 1,
    "moe_renormalize": True,
    "moe_router_activation_func": "sigmoid",
    "num_attention_heads": 32,
    "num_expert_group": 1,
    "num_experts": 256,
    "num_experts_per_token": 8,
    "num_hidden_layers": 27,
    "num_key_value_heads": 32,
    "num_nextn_predict_layers": 0,
    "num_shared_experts": 1,
    "pad_token_id": 163839,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "routed_scaling_factor": 2.446,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "transformers_version": "4.56.0",
    "use_cache": True,
    "use_grouped_topk": True,
    "v_head_dim": 128,
    "vocab_size": 163840,
}


def _small(hidden: int, layers: int, mla_every: int, heads: int, head_dim: int, experts: int, top_k: int,
           moe_inter: int, vocab: int) -> dict[str, Any]:
    """A scaled-down config of the released shape: layer 0 dense, every ``mla_every``-th layer (1-indexed) MLA."""
    mla = [i for i in range(1, layers + 1) if i % mla_every == 0] or [layers]
    return {
        **{k: v for k, v in KIMI_LINEAR_48B_A3B.items() if k not in ("auto_map", "transformers_version")},
        "vocab_size": vocab,
        "hidden_size": hidden,
        "head_dim": hidden // heads,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "intermediate_size": 3 * hidden,
        "moe_intermediate_size": moe_inter,
        "kv_lora_rank": 2 * head_dim,
        "qk_nope_head_dim": head_dim,
        "qk_rope_head_dim": head_dim // 2,
        "v_head_dim": head_dim,
        "linear_attn_config": {
            "full_attn_layers": mla,
            "head_dim": head_dim,
            "kda_layers": [i for i in range(1, layers + 1) if i not in mla],
            "num_heads": heads,
            "short_conv_kernel_size": 4,
        },
        "num_experts": experts,
        "num_experts_per_token": top_k,
        "model_max_length": 65536,
        "dtype": "float32",
        # Byte-level vocabulary: 256 bytes, then BOS, EOS, PAD (see kimi_linear.tokenizer).
        "bos_token_id": 256,
        "eos_token_id": 257,
        "pad_token_id": 258,
    }


PRESETS: dict[str, dict[str, Any]] = {
    "kimi-linear-48b-a3b": KIMI_LINEAR_48B_A3B,
    # The released shape with Block Attention Residuals as the paper trains it: 54 sublayers in blocks of 6 (three
    # decoder layers), 9 blocks + the embedding = 10 sources.
    "kimi-linear-48b-a3b-attnres": {**KIMI_LINEAR_48B_A3B, "attn_res_block_size": 6},
    # CPU-trainable hybrid: 3 KDA + 1 MLA layer, MoE with a shared expert; 6.7M parameters. Head size 32: the
    # chunkwise KDA on CPU runs about twice as fast as with 64 (the built-in training job's 10-minute budget).
    "tiny": _small(hidden=256, layers=4, mla_every=4, heads=4, head_dim=32, experts=8, top_k=2, moe_inter=256,
                   vocab=320),
    # ~1B-parameter hybrid MoE (9 KDA + 3 MLA layers, 16 experts top-2 + shared; ~0.3B activated) for the
    # single-GPU training benchmark (benchmarks/train.py).
    "1b": _small(hidden=1536, layers=12, mla_every=4, heads=12, head_dim=128, experts=16, top_k=2, moe_inter=768,
                 vocab=32768),
    # Smallest complete model, for unit tests.
    "test": _small(hidden=64, layers=4, mla_every=4, heads=2, head_dim=32, experts=4, top_k=2, moe_inter=32,
                   vocab=320),
}
