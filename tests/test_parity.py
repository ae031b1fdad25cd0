"""This stack trains as Hugging Face transformers + torch.optim.AdamW does: a freshly
initialised tiny model of each family, exported by our converter, trained by both on the
same batches for 20 steps with the same schedule, clipping and weight-decay mask, gives
the same losses step by step."""

import numpy as np
import pytest

import input as data_input
import model
from conftest import tiny_config
from train import run

pytest.importorskip("torch")
pytest.importorskip("transformers")

from benchmarks.torch_reference import ReferenceTrainer  # noqa: E402

STEPS = 20
TOLERANCE = 1e-4


def _train_batches(config, count: int) -> list[dict[str, np.ndarray]]:
    """The first `count` global batches of the run, built as `train.run` builds them."""
    tokenizer = data_input.get_tokenizer(config.data.tokenizer)
    (source,) = data_input.data_sources(config.data, tokenizer).train
    dataset = data_input.train_dataset(source.rows, seed=config.seed,
                                       global_batch=config.train.batch_size)
    return [dataset[k] for k in range(count)]


@pytest.mark.parametrize("family, tied", [("gpt2", True), ("gpt2", False), ("llama", False),
                                          ("llama", True)])
@pytest.mark.slow
def test_losses_of_20_steps_match_transformers_and_torch_adamw(tmp_path, family, tied):
    config = tiny_config(
        f"model.family={family}", f"model.tie_embeddings={str(tied).lower()}",
        "model.dtype=float32", f"train.steps={STEPS}", "train.log_every=1",
        "train.eval_batches=0", "checkpoint.every=0", "train.compile_cache=false",
        "optim.learning_rate=3e-3", "optim.warmup_steps=4", "optim.weight_decay=0.1",
        "optim.grad_clip=0.5", "optim.beta2=0.99", f"run_dir={tmp_path}")
    ours = run(config).losses
    reference = ReferenceTrainer(config, model.init_params(config.model, config.seed))
    theirs = {step + 1: reference.step(batch)
              for step, batch in enumerate(_train_batches(config, STEPS))}
    assert sorted(ours) == list(range(1, STEPS + 1))
    differences = [abs(ours[step] - theirs[step]) for step in range(1, STEPS + 1)]
    print(f"{family} tied={tied}: loss {ours[1]:.4f} -> {ours[STEPS]:.4f}, "
          f"max |difference| {max(differences):.2e}")
    assert ours[STEPS] < ours[1] - 0.3  # it learned: the comparison is not of constants
    assert max(differences) < TOLERANCE, differences
