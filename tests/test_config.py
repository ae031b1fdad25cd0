import json

import pytest

import configs
from configs import ConfigError, load
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


@pytest.mark.parametrize("override, message", [
    ("model.num_kv_heads=3", r"model\.num_heads \(4\) must be a multiple of model\.num_kv_heads"),
    ("train.steps=0", r"train\.steps must be positive"),
    ("mesh.fsdp=-1", r"at most one of mesh\.data/fsdp/tensor may be -1"),
    ("data.eval_fraction=1.5", r"data\.eval_fraction must be in \(0, 1\)"),
    ("mesh.rules=[[\"embed\", [\"model\"]]]", r"unknown mesh axes \['model'\]"),
    ("model.family=mamba", r"model\.family must be one of llama, gpt2; got 'mamba'"),
    ("model.remat=some", r"model\.remat must be one of none, full, save_dots"),
    ("model.attention=flash", r"model\.attention must be one of auto, xla, cudnn, splash"),
    ("model.dtype=int8", r"model\.dtype must be one of auto, float32"),
    ("train.microbatches=0", r"train\.microbatches must be positive"),
    ("distributed.num_processes=2", r"need distributed\.coordinator_address"),
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


def test_learned_positions_must_cover_the_sequence_and_processes_their_ids():
    with pytest.raises(ConfigError, match=r"model\.max_positions \(64\) must be at least "
                                          r"data\.seq_len \(128\)"):
        load(None, ["model.family=gpt2", "model.max_positions=64"])
    load(None, ["model.family=llama", "model.max_positions=64"])  # llama has no table
    with pytest.raises(ConfigError, match=r"distributed\.process_id must be in \[0, 2\)"):
        load(None, ["distributed.coordinator_address=localhost:1234",
                    "distributed.num_processes=2", "distributed.process_id=2"])
