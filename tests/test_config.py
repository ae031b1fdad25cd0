import dataclasses
import json
import math
import re
import types
import typing

import pytest

import configs
from configs import ConfigError, load
from configs.coerce import field_hints
from configs.schema import Range
from train.__main__ import main


def test_override_sets_nested_fields():
    config = load(None, ["model.num_layers=2", "train.steps=50", "optim.learning_rate=1e-4",
                         "checkpoint.async_save=false", "data.path=/tmp/x"])
    assert config.model.num_layers == 2
    assert config.train.steps == 50
    assert config.optim.learning_rate == pytest.approx(1e-4)
    assert config.checkpoint.async_save is False
    assert config.data.path == "/tmp/x"


def test_unknown_key_names_closest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.num_layer'.*"
                                          r"did you mean 'model\.num_layers'"):
        load(None, ["model.num_layer=2"])


def test_wrong_type_names_field_and_expected_type():
    with pytest.raises(ConfigError, match=r"model\.num_layers: expected int, got 'two'"):
        load(None, ["model.num_layers=two"])
    with pytest.raises(ConfigError, match=r"optim\.learning_rate: expected float, got 'fast'"):
        load(None, ["optim.learning_rate=fast"])
    with pytest.raises(ConfigError, match=r"checkpoint\.async_save: expected bool"):
        load(None, ["checkpoint.async_save=maybe"])


def test_cli_rejects_bad_key_before_any_work(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main([f"run_dir={run_dir}", "train.step=5"])
    assert code == 2
    assert "did you mean 'train.steps'" in capsys.readouterr().err
    assert not run_dir.exists()


def test_config_file_round_trip_and_file_errors(tmp_path):
    config = load(None, ["model.num_layers=3", "mesh.rules=[[\"batch\", [\"data\"]]]"])
    path = tmp_path / "config.json"
    path.write_text(configs.to_json(config))
    assert load(str(path)) == config
    assert load(str(path)).mesh.rules == (("batch", ("data",)),)

    path.write_text(json.dumps({"model": {"num_layerz": 3}}))
    with pytest.raises(ConfigError, match=r"model\.num_layerz.*model\.num_layers"):
        load(str(path))
    with pytest.raises(ConfigError, match="neither a preset"):
        load(str(tmp_path / "missing.json"))


def test_a_config_saved_before_matmul_existed_loads_and_restores():
    """Such a run trained with `attention: xla` (then the hand-written kernel, numerically the
    plain one); `matmul` takes its default, resolved when the run resumes."""
    from checkpoint.compat import model_mismatch

    saved = configs.to_dict(load(None, ["model.dtype=float32", "model.attention=xla"]))
    del saved["model"]["matmul"]
    config = configs.from_dict(saved)
    assert (config.model.attention, config.model.matmul) == ("xla", "auto")
    resolved = configs.resolve_auto(config.model, "cpu")
    assert (resolved.attention, resolved.matmul) == ("xla", "cpu")
    current = configs.to_dict(dataclasses.replace(config, model=resolved))
    assert model_mismatch(saved, current) == []


@pytest.mark.parametrize("override, message", [
    ("model.num_kv_heads=3", r"model\.num_heads \(4\) must be a multiple of model\.num_kv_heads"),
    ("train.steps=0", r"train\.steps must be positive"),
    ("mesh.fsdp=-1", r"at most one of mesh\.data/fsdp/tensor may be -1"),
    ("data.eval_fraction=1.5", r"data\.eval_fraction must be in \[0, 1\)"),
    ("mesh.rules=[[\"embed\", [\"model\"]]]", r"unknown mesh axes \['model'\]"),
    ("model.family=mamba", r"model\.family must be one of llama, gpt2; got 'mamba'"),
    ("model.remat=some", r"model\.remat must be one of none, full, save_dots"),
    ("model.attention=flash", r"model\.attention must be one of auto, xla, cpu, cudnn, splash"),
    ("model.matmul=blas", r"model\.matmul must be one of auto, xla, cpu"),
    ("model.dtype=int8", r"model\.dtype must be one of auto, float32"),
    ("train.microbatches=0", r"train\.microbatches must be positive"),
    ("distributed.num_processes=2", r"need distributed\.coordinator_address"),
    ("model.embed_dim=130", r"model\.head_dim is not set and model\.embed_dim \(130\) is not a "
                            r"multiple of model\.num_heads \(4\)"),
    ("model.attention_dropout=1.0", r"model\.attention_dropout must be in \[0, 1\)"),
    ("model.residual_dropout=-0.1", r"model\.residual_dropout must be in \[0, 1\)"),
    ("model.init_std=-1", r"model\.init_std must be >= 0"),
    ("optim.schedule=step", r"optim\.schedule must be one of cosine, linear, constant, wsd"),
    ("optim.min_lr=1.0", r"optim\.min_lr \(1\.0\) must be in \[0, optim\.learning_rate"),
    ("optim.decay_steps=0", r"optim\.decay_steps must be positive"),
    ("optim.eps=-1e-8", r"optim\.eps must be >= 0"),
    ("optim.beta2=1.0", r"optim\.beta2 must be in \[0, 1\)"),
    ("optim.wsd_decay_fraction=0", r"optim\.wsd_decay_fraction must be in \(0, 1\]"),
    ("train.eval_batches=-2", r"train\.eval_batches must be >= 0, or -1 for all"),
])
def test_invalid_combinations_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load(None, [override])


def test_mixture_parses_and_bad_mixtures_name_the_field():
    config = load(None, ['data.mixture=[["data/a", 0.7], ["data/b", 3]]'])
    assert config.data.mixture == (("data/a", 0.7), ("data/b", 3.0))
    with pytest.raises(ConfigError, match=r"data\.mixture: the weight of 'data/b' must be"):
        load(None, ['data.mixture=[["data/a", 1], ["data/b", 0]]'])
    with pytest.raises(ConfigError, match=r"data\.mixture: expected a list of \[path, weight\]"):
        load(None, ['data.mixture=data/a'])
    with pytest.raises(ConfigError, match="data.path and data.mixture are both set"):
        load(None, ['data.mixture=[["data/a", 1]]', "data.path=x"])


def test_each_family_derives_the_shape_fields_left_unset():
    gpt2 = load(None, ["model.family=gpt2", "model.embed_dim=96", "model.num_heads=3",
                       "model.mlp_dim=none"]).model
    assert (gpt2.num_kv_heads, gpt2.head_dim, gpt2.mlp_dim, gpt2.bias) == (3, 32, 384, True)
    llama = load(None, ["model.embed_dim=4096", "model.num_heads=32", "model.mlp_dim=auto"]).model
    assert (llama.num_kv_heads, llama.head_dim, llama.mlp_dim, llama.bias) == (32, 128, 11008,
                                                                               False)
    assert (llama.embed_init_std, llama.unembed_init_std) == (0.02, 0.02)
    grouped = load(None, ["model.num_kv_heads=2", "model.head_dim=16", "model.bias=true"]).model
    assert (grouped.num_kv_heads, grouped.head_dim, grouped.bias) == (2, 16, True)


def test_a_gpt2_shape_that_does_not_fit_names_the_fields():
    with pytest.raises(ConfigError, match=r"model\.num_kv_heads \(2\) must equal "
                                          r"model\.num_heads \(4\) for gpt2"):
        load(None, ["model.family=gpt2", "model.num_kv_heads=2"])
    with pytest.raises(ConfigError, match=r"model\.num_heads x model\.head_dim \(4 x 16\) must "
                                          r"equal model\.embed_dim \(128\) for gpt2"):
        load(None, ["model.family=gpt2", "model.head_dim=16"])
    with pytest.raises(ConfigError, match=r"model\.attention_dropout needs model\.attention=xla"):
        load(None, ["model.attention_dropout=0.1", "model.attention=cudnn"])
    with pytest.raises(ConfigError, match=r"model\.head_dim: expected int or none, got 'wide'"):
        load(None, ["model.head_dim=wide"])


def test_learned_positions_must_cover_the_sequence_and_processes_their_ids():
    with pytest.raises(ConfigError, match=r"model\.max_positions \(64\) must be at least "
                                          r"data\.seq_len \(128\)"):
        load(None, ["model.family=gpt2", "model.max_positions=64"])
    load(None, ["model.family=llama", "model.max_positions=64"])  # llama has no table
    with pytest.raises(ConfigError, match=r"distributed\.process_id must be in \[0, 2\)"):
        load(None, ["distributed.coordinator_address=localhost:1234",
                    "distributed.num_processes=2", "distributed.process_id=2"])


def _base_type(hint):
    """`X` of a field typed `X`, `X | None`, `Annotated[X, ...]` or `Annotated[X, ...] | None`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


# Read from the schema, so that a field given choices or a range later is covered too.
CHOICE_FIELDS = [(key, typing.get_args(_base_type(hint))) for key, hint in field_hints().items()
                 if typing.get_origin(_base_type(hint)) is typing.Literal]
RANGE_FIELDS = [(key, _base_type(hint).__origin__, bound)
                for key, hint in field_hints().items()
                if typing.get_origin(_base_type(hint)) is typing.Annotated
                for bound in _base_type(hint).__metadata__ if isinstance(bound, Range)]


def _just_outside(bound: Range, kind: type) -> list:
    """The closest values of type `kind` below and above `bound` that it excludes."""
    def beyond(end, is_open, direction):
        if is_open:
            return kind(end)
        return end + direction if kind is int else math.nextafter(end, direction * math.inf)
    return ([beyond(bound.min, bound.min_open, -1)] if bound.min is not None else []) + (
        [beyond(bound.max, bound.max_open, +1)] if bound.max is not None else [])


def test_the_schema_declares_the_choice_and_range_fields():
    assert {key for key, _ in CHOICE_FIELDS} >= {"model.family", "model.dtype", "model.attention",
                                                 "model.matmul", "model.remat", "optim.schedule"}
    ranged = {key for key, _, _ in RANGE_FIELDS}
    assert {"model.vocab_size", "model.head_dim", "optim.decay_steps", "seed", "optim.beta2",
            "train.eval_batches", "model.residual_init_std"} <= ranged


@pytest.mark.parametrize("key, allowed", CHOICE_FIELDS, ids=[k for k, _ in CHOICE_FIELDS])
def test_every_choice_field_rejects_an_unknown_value_naming_its_choices(key, allowed):
    message = f"{key} must be one of {', '.join(allowed)}; got "
    with pytest.raises(ConfigError, match=re.escape(message + "'bogus'")):
        load(None, [f"{key}=bogus"])
    with pytest.raises(ConfigError, match=re.escape(message + "7")):  # from a JSON config file
        configs.from_dict(_nested(key, 7))


@pytest.mark.parametrize("key, kind, bound", RANGE_FIELDS, ids=[k for k, _, _ in RANGE_FIELDS])
def test_every_range_field_rejects_a_value_just_outside_it(key, kind, bound):
    values = _just_outside(bound, kind)
    assert values
    for value in values:
        message = rf"^{re.escape(key)} must be .*got {re.escape(str(value))}$"
        with pytest.raises(ConfigError, match=message):
            load(None, [f"{key}={value!r}"])


def test_range_describes_itself_as_the_messages_do():
    assert Range(min=0, min_open=True).describe() == "positive"
    assert Range(min=0).describe() == ">= 0"
    assert Range(0, 1, max_open=True).describe() == "in [0, 1)"
    assert Range(0.0, 1.0, min_open=True).describe() == "in (0, 1]"
    assert Range(0, 2**32, max_open=True).describe() == "in [0, 2**32)"
    assert Range(max=0.5, max_open=True).describe() == "< 0.5"
    assert 0.5 in Range(0, 1) and 1 in Range(0, 1) and 1 not in Range(0, 1, max_open=True)
    assert Range(min=-1, message="must be -1 or more; got {value}").error(-3) == (
        "must be -1 or more; got -3")


def _nested(key, value):
    *sections, leaf = key.split(".")
    data = {leaf: value}
    for section in reversed(sections):
        data = {section: data}
    return data
