"""Hugging Face interop: converted GPT-2 and Llama models give transformers' logits, the
round trip is exact, unsupported configs are refused by field, and converted runs sample
and fine-tune. Models are random and tiny, built and saved locally (no network)."""

import dataclasses
import json

import jax
import numpy as np
import pytest

import configs
import model
import storage
from generate import load
from generate.__main__ import main as generate_main
from hf.convert import from_hf, main
from hf.format import ConversionError, hf_config
from input.tokenizer import train_bpe
from train import run

VOCAB = 300  # >= the byte tokenizer's 258, so converted runs train and sample as they are
TOLERANCE = 1e-4


def _require_hf():
    """torch and transformers (the `hf` extra), or skip: the suite runs without them."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    return torch, transformers


def _hf_model(family: str, tied: bool, **extra):
    """A tiny randomly initialised transformers model, every weight random (biases and norm
    scales included, which HF initialises to constants)."""
    torch, transformers = _require_hf()
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=2,
                                         n_head=4, tie_word_embeddings=tied, **extra)
        module = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=tied, **extra)
        module = transformers.LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in module.parameters():
            weight.copy_(0.2 * torch.randn(weight.shape, generator=generator))
    return module.eval()


def _save(hf_model, directory, shard: str | None = None):
    if shard:  # small shards: the index file and several *.safetensors are read
        hf_model.save_pretrained(directory, max_shard_size=shard)
        assert (directory / "model.safetensors.index.json").is_file()
    else:
        hf_model.save_pretrained(directory)
    return directory


def _tokens(batch: int = 2, length: int = 24) -> np.ndarray:
    return np.random.default_rng(1).integers(0, VOCAB, (batch, length))


def _torch_logits(hf_model, tokens_BxL: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return hf_model(torch.tensor(tokens_BxL)).logits.numpy()


def _our_logits(run_dir, tokens_BxL: np.ndarray) -> np.ndarray:
    loaded = load(run_dir)
    cfg = dataclasses.replace(loaded.config.model, dtype="float32")
    return np.asarray(jax.jit(lambda p: model.merge(cfg, p)(tokens_BxL))(loaded.params))


def _host(params) -> dict:
    return jax.tree.map(np.asarray, jax.device_get(params))


@pytest.mark.parametrize("family, tied, shard, overrides", [
    ("gpt2", True, None, []),
    pytest.param("gpt2", False, "40KB", [], marks=pytest.mark.slow),
    ("llama", False, "40KB", []),
    pytest.param("llama", True, None, ["model.scan_layers=true"], marks=pytest.mark.slow),
])
def test_converted_model_gives_the_transformers_logits(tmp_path, family, tied, shard, overrides):
    hf_model = _hf_model(family, tied)
    hf_dir = _save(hf_model, tmp_path / "hf", shard)
    run_dir = tmp_path / "run"
    assert main(["--from-hf", str(hf_dir), "--out", str(run_dir), *overrides]) == 0
    tokens = _tokens()
    ours, theirs = _our_logits(run_dir, tokens), _torch_logits(hf_model, tokens)
    difference = float(np.abs(ours - theirs).max())
    print(f"{family} tied={tied}: max |logit difference| {difference:.3g}")
    assert difference < TOLERANCE
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["family"] == family and config["model"]["tie_embeddings"] == tied
    assert config["model"]["scan_layers"] == bool(overrides)


@pytest.mark.parametrize("family, tied", [("gpt2", True), ("gpt2", False), ("llama", False),
                                          ("llama", True)])
def test_to_hf_loads_in_transformers_and_round_trips_exactly(tmp_path, family, tied):
    torch, transformers = _require_hf()
    hf_model = _hf_model(family, tied)
    first = tmp_path / "first"
    from_hf(_save(hf_model, tmp_path / "hf"), first, ["model.scan_layers=true"])
    assert main(["--to-hf", str(first), "--out", str(tmp_path / "back")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(back) is type(hf_model)
    original, written = hf_model.state_dict(), back.state_dict()
    assert set(original) == set(written)
    for name, tensor in original.items():
        assert torch.equal(tensor, written[name]), name
    tokens = _tokens()  # the same function too: config.json carries theta, eps, tying
    np.testing.assert_array_equal(_torch_logits(back, tokens), _torch_logits(hf_model, tokens))
    from_hf(tmp_path / "back", tmp_path / "second", ["model.scan_layers=true"])
    again, before = _host(load(tmp_path / "second").params), _host(load(first).params)
    assert jax.tree.structure(again) == jax.tree.structure(before)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(before), strict=True):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()  # bit-identical


def test_gpt2_file_without_prefix_and_with_mask_buffers_is_read(tmp_path):
    """The layout of the original `gpt2` upload: base-model names (`h.0.attn...`, no
    `transformer.`) and each layer's causal-mask buffer `h.N.attn.bias` saved with them."""
    torch, _ = _require_hf()
    from safetensors.torch import save_file

    hf_model = _hf_model("gpt2", tied=True)
    tensors = {name: tensor.contiguous() for name, tensor in
               hf_model.transformer.state_dict().items()}
    mask = torch.tril(torch.ones(32, 32, dtype=torch.bool)).view(1, 1, 32, 32)
    tensors |= {f"h.{i}.attn.bias": mask.clone() for i in range(2)}
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    hf_model.config.to_json_file(hf_dir / "config.json")
    from_hf(hf_dir, tmp_path / "run")
    tokens = _tokens()
    assert np.abs(_our_logits(tmp_path / "run", tokens)
                  - _torch_logits(hf_model, tokens)).max() < TOLERANCE


def test_bfloat16_weights_are_read_exactly(tmp_path):
    torch, _ = _require_hf()
    hf_model = _hf_model("llama", tied=False).to(torch.bfloat16)
    from_hf(_save(hf_model, tmp_path / "hf"), tmp_path / "run")
    params = _host(load(tmp_path / "run").params)
    embed = hf_model.model.embed_tokens.weight.detach().float().numpy()
    np.testing.assert_array_equal(params["embed_VxD"], embed)
    down = hf_model.model.layers[1].mlp.down_proj.weight.detach().float().numpy()
    np.testing.assert_array_equal(params["blocks"][1]["mlp"]["w_down_FxD"], down.T)


LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB,
         "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2}
GPT2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": VOCAB,
        "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 32}


@pytest.mark.parametrize("config, field", [
    ({**LLAMA, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
    ({**LLAMA, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}},
     "rope_parameters.rope_type"),
    ({**LLAMA, "attention_bias": True}, "attention_bias"),
    ({**LLAMA, "mlp_bias": True}, "mlp_bias"),
    ({**LLAMA, "hidden_act": "gelu"}, "hidden_act"),
    ({**GPT2, "activation_function": "gelu"}, "activation_function"),
    ({**GPT2, "scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({**GPT2, "model_type": "mistral"}, "model_type"),
    ({**GPT2, "architectures": ["GPT2ForSequenceClassification"]}, "architectures"),
    ({k: v for k, v in LLAMA.items() if k != "intermediate_size"}, "intermediate_size"),
])
def test_unsupported_config_is_refused_naming_the_field(tmp_path, capsys, config, field):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=field):
        from_hf(tmp_path, tmp_path / "run")
    assert main(["--from-hf", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    assert field in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing written before the refusal


def test_to_hf_refuses_a_gpt2_shape_transformers_cannot_express():
    grouped = configs.ModelConfig(family="gpt2", num_heads=4, num_kv_heads=2)
    with pytest.raises(ConversionError, match="num_kv_heads"):
        hf_config(grouped)
    with pytest.raises(ConversionError, match="model.bias=false"):
        hf_config(configs.ModelConfig(family="gpt2", bias=False))


def test_llama_with_biases_gives_the_transformers_logits_and_round_trips(tmp_path):
    torch, transformers = _require_hf()
    hf_model = _hf_model("llama", tied=False, attention_bias=True, mlp_bias=True)
    from_hf(_save(hf_model, tmp_path / "hf"), tmp_path / "run")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["bias"] is True
    tokens = _tokens()
    difference = np.abs(_our_logits(tmp_path / "run", tokens) - _torch_logits(hf_model, tokens))
    assert float(difference.max()) < TOLERANCE
    assert main(["--to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "back")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    for name, tensor in hf_model.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[name]), name


def test_overrides_may_not_change_the_model_shape(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    with pytest.raises(ConversionError, match="model.num_layers"):
        from_hf(tmp_path, tmp_path / "run", ["model.num_layers=3"])


@pytest.mark.slow
def test_converted_run_samples_and_fine_tunes_with_its_tokenizer(tmp_path, capsys):
    hf_dir = _save(_hf_model("llama", tied=False), tmp_path / "hf")
    docs = ["The quick brown fox jumps over the lazy dog. " * 4, "Lists in Python are " * 6]
    train_bpe(iter(docs * 3), VOCAB, hf_dir / "tokenizer.json")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"{i}.txt").write_text(docs[i % 2] + str(i))
    run_dir = tmp_path / "run"
    from_hf(hf_dir, run_dir)
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["data"]["tokenizer"] == str((run_dir / "tokenizer.json").absolute())

    assert generate_main([str(run_dir), "--prompt", "The quick", "--max-new-tokens", "6",
                          "--temperature", "0"]) == 0
    assert "--- 'The quick'" in capsys.readouterr().out

    config = configs.load(str(run_dir / "config.json"), [
        f"data.path={corpus}", "data.seq_len=32", "train.steps=2", "train.batch_size=8",
        "train.eval_batches=0", "checkpoint.every=0"])
    result = run(config)
    assert "resumed from checkpoint step 0" in capsys.readouterr().out
    assert result.final_step == 2 and np.isfinite(result.losses[2])


def test_convert_reads_and_writes_buckets_exactly(bucket, tmp_path, capsys):
    """--from-hf gs:// (a sharded upload) to a run in the bucket, and --to-hf back into the
    bucket: transformers loads the very same weights."""
    torch, transformers = _require_hf()
    hf_model = _hf_model("llama", tied=False)
    remote_hf = storage.path(f"{bucket}/hf")
    local_hf = _save(hf_model, tmp_path / "hf", shard="60KB")
    train_bpe(iter(["The quick brown fox jumps over the lazy dog. " * 8] * 3), VOCAB,
              local_hf / "tokenizer.json")
    for file in local_hf.iterdir():
        (remote_hf / file.name).write_bytes(file.read_bytes())
    assert main(["--from-hf", f"{bucket}/missing", "--out", f"{bucket}/nothing"]) == 2
    assert f"{bucket}/missing/config.json does not exist" in capsys.readouterr().err

    assert main(["--from-hf", str(remote_hf), "--out", f"{bucket}/run"]) == 0
    saved = json.loads(storage.path(f"{bucket}/run/config.json").read_text())
    assert saved["run_dir"] == f"{bucket}/run"
    assert saved["data"]["tokenizer"] == f"{bucket}/run/tokenizer.json"  # its own copy
    assert main(["--to-hf", f"{bucket}/run", "--out", f"{bucket}/back"]) == 0
    assert sorted(storage.files_under(f"{bucket}/back")) == [
        "config.json", "model.safetensors", "tokenizer.json"]
    assert storage.path(f"{bucket}/back/tokenizer.json").read_bytes() == (
        local_hf / "tokenizer.json").read_bytes()
    with storage.local_copy(f"{bucket}/back") as back_dir:
        back = transformers.AutoModelForCausalLM.from_pretrained(back_dir).eval()
    original, written = hf_model.state_dict(), back.state_dict()
    assert set(original) == set(written)
    for name, tensor in original.items():
        assert torch.equal(tensor, written[name]), name
