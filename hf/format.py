"""A Hugging Face GPT-2 / Llama checkpoint in our terms: config.json <-> ModelConfig, and the
tensors of its state dict <-> our parameter tree. Only the mapping; `convert` does the files.

One table of `Rule`s per family is read in both directions, so what `params_to_hf` writes
`params_from_hf` reads back bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

import model
from configs.resolve import derive_model
from configs.schema import ModelConfig

Params = dict[str, Any]
Path = tuple[Any, ...]  # keys from the root of our parameter tree to one array

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}
# Both are GELU's tanh approximation, which is what our GPT-2 MLP computes.
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


class ConversionError(ValueError):
    """A Hugging Face model or one of our runs cannot be converted; the message says why."""


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Our model config for a Hugging Face config.json; refuses what our model cannot compute."""
    family = _family(hf)
    if family == "gpt2":
        _refuse_gpt2_options(hf)
        d, heads = _required(hf, "n_embd"), _required(hf, "n_head")
        if d % heads:
            raise ConversionError(f"config.json: n_embd ({d}) is not a multiple of n_head "
                                  f"({heads})")
        return ModelConfig(
            family="gpt2", vocab_size=_required(hf, "vocab_size"), embed_dim=d,
            num_layers=_required(hf, "n_layer"), num_heads=heads, num_kv_heads=heads,
            head_dim=d // heads, mlp_dim=hf.get("n_inner") or 4 * d,
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), bias=True,
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            max_positions=_required(hf, "n_positions"))
    _refuse_llama_options(hf)
    d, heads = _required(hf, "hidden_size"), _required(hf, "num_attention_heads")
    return ModelConfig(
        family="llama", vocab_size=_required(hf, "vocab_size"), embed_dim=d,
        num_layers=_required(hf, "num_hidden_layers"), num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or d // heads, mlp_dim=_required(hf, "intermediate_size"),
        rope_theta=_rope_theta(hf), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        bias=bool(hf.get("attention_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_positions=hf.get("max_position_embeddings", ModelConfig.max_positions))


def hf_config(cfg: ModelConfig, eos_id: int | None = None) -> dict[str, Any]:
    """The config.json of our model as a Hugging Face GPT2LMHeadModel or LlamaForCausalLM."""
    cfg = derive_model(cfg)
    common = {"architectures": [ARCHITECTURES[cfg.family]], "model_type": cfg.family,
              "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
              "torch_dtype": "float32"}
    if eos_id is not None:  # HF's generate() stops there, as ours does
        common["eos_token_id"] = eos_id
    if cfg.family == "gpt2":
        if not cfg.bias:
            raise ConversionError("GPT-2 has biases in every projection; this run has "
                                  "model.bias=false")
        if cfg.num_kv_heads != cfg.num_heads or cfg.num_heads * cfg.head_dim != cfg.embed_dim:
            raise ConversionError(
                "GPT-2 needs model.num_kv_heads == model.num_heads and model.num_heads x "
                f"model.head_dim == model.embed_dim; this run has {cfg.num_heads} heads, "
                f"{cfg.num_kv_heads} kv heads of {cfg.head_dim} in {cfg.embed_dim}")
        return common | {
            "n_embd": cfg.embed_dim, "n_layer": cfg.num_layers, "n_head": cfg.num_heads,
            "n_inner": cfg.mlp_dim, "n_positions": cfg.max_positions,
            "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "add_cross_attention": False,
            "attn_pdrop": cfg.attention_dropout, "embd_pdrop": cfg.embed_dropout,
            "resid_pdrop": cfg.residual_dropout}
    return common | {
        "hidden_size": cfg.embed_dim, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "intermediate_size": cfg.mlp_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_positions, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": None, "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias, "attention_dropout": cfg.attention_dropout}


def _family(hf: dict[str, Any]) -> str:
    family = hf.get("model_type")
    if family not in ARCHITECTURES:
        raise ConversionError(f"config.json: model_type {family!r} is not supported; only "
                              f"{' and '.join(ARCHITECTURES)} are")
    architectures = hf.get("architectures") or [ARCHITECTURES[family]]
    if architectures != [ARCHITECTURES[family]]:
        raise ConversionError(f"config.json: architectures {architectures} is not supported; "
                              f"for model_type {family!r} only {ARCHITECTURES[family]} is")
    return family


def _required(hf: dict[str, Any], field: str) -> Any:
    if hf.get(field) is None:
        raise ConversionError(f"config.json has no {field}")
    return hf[field]


def _refuse(field: str, value: Any, supported: str) -> ConversionError:
    return ConversionError(f"config.json: {field}={value!r} is not supported ({supported})")


def _refuse_gpt2_options(hf: dict[str, Any]) -> None:
    activation = hf.get("activation_function", "gelu_new")
    if activation not in TANH_GELUS:
        raise _refuse("activation_function", activation,
                      f"our GPT-2 MLP is GELU's tanh approximation: {', '.join(TANH_GELUS)}")
    if not hf.get("scale_attn_weights", True):
        raise _refuse("scale_attn_weights", False, "attention scores are scaled by 1/sqrt(K)")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        raise _refuse("scale_attn_by_inverse_layer_idx", True, "no per-layer score scaling")
    if hf.get("add_cross_attention", False):
        raise _refuse("add_cross_attention", True, "decoder-only models")


def _refuse_llama_options(hf: dict[str, Any]) -> None:
    if hf.get("hidden_act", "silu") != "silu":
        raise _refuse("hidden_act", hf["hidden_act"], "our Llama MLP is SwiGLU: silu")
    if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
        raise _refuse("mlp_bias", hf.get("mlp_bias", False),
                      "model.bias puts biases in attention and MLP alike; attention_bias is "
                      f"{hf.get('attention_bias', False)!r}")
    # transformers < 5 writes rope_scaling; 5 writes rope_parameters (with the theta in it).
    scaling = hf.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) != "default":
        raise _refuse("rope_scaling", scaling, "plain rotary embeddings only")
    rope_type = (hf.get("rope_parameters") or {}).get("rope_type", "default")
    if rope_type != "default":
        raise _refuse("rope_parameters.rope_type", rope_type, "plain rotary embeddings only")


def _rope_theta(hf: dict[str, Any]) -> float:
    theta = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One Hugging Face tensor and the parameter(s) of ours it holds.

    Seen as an [in, out] matrix (a vector when `inputs` is 0), the HF tensor is our
    parameters, each flattened to [in, out], concatenated along out: GPT-2's fused
    c_attn holds our q, k and v projections side by side.
    """

    hf: str
    ours: tuple[Path, ...]
    transpose: bool = False
    """HF stores it [out, in] (torch.nn.Linear); GPT-2's Conv1D and the tables are [in, out]."""
    inputs: int = 1
    """Leading axes of our parameter that are HF's input features."""


def rules(cfg: ModelConfig) -> list[Rule]:
    """Every tensor of the family's HF state dict (a *ForCausalLM's names), layer by layer."""
    return _gpt2_rules(cfg) if cfg.family == "gpt2" else _llama_rules(cfg)


def _gpt2_rules(cfg: ModelConfig) -> list[Rule]:
    table = [Rule("transformer.wte.weight", (("embed_VxD",),)),
             Rule("transformer.wpe.weight", (("positions_PxD",),))]
    for i in range(cfg.num_layers):
        hf, attn, mlp = f"transformer.h.{i}.", ("blocks", i, "attn"), ("blocks", i, "mlp")
        table += [
            *_norm_rules(hf + "ln_1", ("blocks", i, "attn_norm"), bias=True),
            Rule(hf + "attn.c_attn.weight", (attn + ("wq_DxHxK",), attn + ("wk_DxGxK",),
                                             attn + ("wv_DxGxK",))),
            Rule(hf + "attn.c_attn.bias", (attn + ("bq_HxK",), attn + ("bk_GxK",),
                                           attn + ("bv_GxK",)), inputs=0),
            Rule(hf + "attn.c_proj.weight", (attn + ("wo_HxKxD",),), inputs=2),
            Rule(hf + "attn.c_proj.bias", (attn + ("bo_D",),), inputs=0),
            *_norm_rules(hf + "ln_2", ("blocks", i, "mlp_norm"), bias=True),
            Rule(hf + "mlp.c_fc.weight", (mlp + ("w_in_DxF",),)),
            Rule(hf + "mlp.c_fc.bias", (mlp + ("b_in_F",),), inputs=0),
            Rule(hf + "mlp.c_proj.weight", (mlp + ("w_out_FxD",),)),
            Rule(hf + "mlp.c_proj.bias", (mlp + ("b_out_D",),), inputs=0)]
    table += _norm_rules("transformer.ln_f", ("final_norm",), bias=True)
    return table + _unembed_rules(cfg)


def _llama_rules(cfg: ModelConfig) -> list[Rule]:
    table = [Rule("model.embed_tokens.weight", (("embed_VxD",),))]
    for i in range(cfg.num_layers):
        hf, attn, mlp = f"model.layers.{i}.", ("blocks", i, "attn"), ("blocks", i, "mlp")
        table += [
            *_norm_rules(hf + "input_layernorm", ("blocks", i, "attn_norm"), bias=False),
            Rule(hf + "self_attn.q_proj.weight", (attn + ("wq_DxHxK",),), transpose=True),
            Rule(hf + "self_attn.k_proj.weight", (attn + ("wk_DxGxK",),), transpose=True),
            Rule(hf + "self_attn.v_proj.weight", (attn + ("wv_DxGxK",),), transpose=True),
            Rule(hf + "self_attn.o_proj.weight", (attn + ("wo_HxKxD",),), transpose=True,
                 inputs=2),
            *_norm_rules(hf + "post_attention_layernorm", ("blocks", i, "mlp_norm"), bias=False),
            Rule(hf + "mlp.gate_proj.weight", (mlp + ("w_gate_DxF",),), transpose=True),
            Rule(hf + "mlp.up_proj.weight", (mlp + ("w_up_DxF",),), transpose=True),
            Rule(hf + "mlp.down_proj.weight", (mlp + ("w_down_FxD",),), transpose=True)]
        if cfg.bias:
            table += [Rule(f"{hf}{module}.bias", (ours + (name,),), inputs=0)
                      for module, ours, name in _llama_biases(attn, mlp)]
    table += _norm_rules("model.norm", ("final_norm",), bias=False)
    return table + _unembed_rules(cfg)


def _llama_biases(attn: Path, mlp: Path) -> list[tuple[str, Path, str]]:
    """Llama's biases (attention_bias, mlp_bias): HF module, our module, our parameter."""
    return [("self_attn.q_proj", attn, "bq_HxK"), ("self_attn.k_proj", attn, "bk_GxK"),
            ("self_attn.v_proj", attn, "bv_GxK"), ("self_attn.o_proj", attn, "bo_D"),
            ("mlp.gate_proj", mlp, "b_gate_F"), ("mlp.up_proj", mlp, "b_up_F"),
            ("mlp.down_proj", mlp, "b_down_D")]


def _norm_rules(hf: str, ours: Path, bias: bool) -> list[Rule]:
    scale = [Rule(f"{hf}.weight", (ours + ("scale",),), inputs=0)]
    return scale + [Rule(f"{hf}.bias", (ours + ("bias",),), inputs=0)] if bias else scale


def _unembed_rules(cfg: ModelConfig) -> list[Rule]:
    # A tied model has no head of its own: HF ties lm_head to the embedding table as we do.
    return [] if cfg.tie_embeddings else [Rule("lm_head.weight", (("unembed_DxV",),),
                                               transpose=True)]


def _as_matrix(shape: tuple[int, ...], inputs: int) -> tuple[int, ...]:
    return (math.prod(shape[:inputs]), math.prod(shape[inputs:])) if inputs else (math.prod(shape),)


def _hf_shape(rule: Rule, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    out = sum(_as_matrix(s, rule.inputs)[-1] for s in shapes)
    shape = (*_as_matrix(shapes[0], rule.inputs)[:-1], out)
    return shape[::-1] if rule.transpose else shape


def split_to_ours(rule: Rule, tensor: np.ndarray,
                  shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """The HF tensor as our parameter(s) of these shapes, float32."""
    if tensor.shape != _hf_shape(rule, shapes):
        raise ConversionError(f"tensor {rule.hf} has shape {list(tensor.shape)}; config.json "
                              f"implies {list(_hf_shape(rule, shapes))}")
    matrix = np.asarray(tensor).astype(np.float32)
    matrix = matrix.T if rule.transpose else matrix
    widths = [_as_matrix(s, rule.inputs)[-1] for s in shapes]
    parts = np.split(matrix, np.cumsum(widths)[:-1], axis=-1)
    return [np.ascontiguousarray(part).reshape(s) for part, s in zip(parts, shapes, strict=True)]


def join_to_hf(rule: Rule, arrays: list[np.ndarray]) -> np.ndarray:
    """Our parameter(s) as the one HF tensor, float32 and contiguous (safetensors needs it)."""
    matrix = np.concatenate([np.asarray(a, np.float32).reshape(_as_matrix(a.shape, rule.inputs))
                             for a in arrays], axis=-1)
    return np.ascontiguousarray(matrix.T if rule.transpose else matrix)


def params_from_hf(tensors: dict[str, Callable[[], np.ndarray]], cfg: ModelConfig) -> Params:
    """Our unstacked parameter tree from HF tensors (name -> loader), checking every name."""
    shapes = _unstacked_shapes(cfg)
    expected = rules(cfg)
    missing = [rule.hf for rule in expected if rule.hf not in tensors]
    if missing:
        hint = (" (tie_word_embeddings is false but there is no lm_head)"
                if "lm_head.weight" in missing else "")
        raise ConversionError(f"the safetensors files lack {_some(missing)}{hint}")
    extra = set(tensors) - {rule.hf for rule in expected}
    if extra:
        raise ConversionError(f"the safetensors files hold tensors our {cfg.family} model has no "
                              f"place for: {_some(sorted(extra))}")
    params: Params = {}
    for rule in expected:
        arrays = split_to_ours(rule, tensors[rule.hf](), [_get(shapes, p) for p in rule.ours])
        for path, array in zip(rule.ours, arrays, strict=True):
            _set(params, path, array)
    return params


def params_to_hf(params: Params, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """HF state dict (name -> float32 array) of our unstacked parameter tree."""
    return {rule.hf: join_to_hf(rule, [np.asarray(_get(params, p)) for p in rule.ours])
            for rule in rules(cfg)}


def _unstacked_shapes(cfg: ModelConfig) -> Params:
    unstacked = dataclasses.replace(cfg, scan_layers=False)
    return jax.tree.map(lambda s: tuple(s.shape), model.abstract_params(unstacked))


def _get(tree: Any, path: Path) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: Params, path: Path, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _some(names: list[str], count: int = 5) -> str:
    more = f" and {len(names) - count} more" if len(names) > count else ""
    return ", ".join(names[:count]) + more
