import jax
import numpy as np
import pytest

import sharding
from conftest import tiny_config
from input import ByteTokenizer, PackedRows, token_stream, train_dataset, train_iterator
from train.feed import DataPosition, DeviceFeed


def test_feed_yields_sharded_batches_in_order_with_their_positions():
    config = tiny_config("mesh.data=8")
    tokenizer = ByteTokenizer()
    rows = PackedRows(token_stream([f"doc {i} " * 20 for i in range(50)], tokenizer), 16,
                      tokenizer.pad_id, tokenizer.eos_id)
    dataset = train_dataset(rows, seed=1, global_batch=8)
    mesh = sharding.make_mesh(config.mesh)
    batch_sharding = sharding.batch_sharding(mesh, config.mesh.rules)
    with DeviceFeed(train_iterator(dataset, config.data), batch_sharding, depth=3) as feed:
        for k in range(5):
            batch, position = next(feed)
            assert position == DataPosition(k + 1)
            assert batch["inputs"].sharding == batch_sharding
            np.testing.assert_array_equal(np.asarray(batch["inputs"]), dataset[k]["inputs"])


def test_feed_raises_the_pipeline_error_in_the_training_thread():
    def broken():
        yield {"inputs": np.zeros((8, 4), np.int32)}
        raise OSError("disk went away")

    class Iterator:
        def __init__(self):
            self.items = broken()

        def __next__(self):
            return next(self.items)

    mesh = sharding.make_mesh(tiny_config("mesh.data=8").mesh)
    with DeviceFeed(Iterator(), sharding.batch_sharding(mesh, tiny_config().mesh.rules)) as feed:
        batch, _ = next(feed)
        assert isinstance(batch["inputs"], jax.Array)
        with pytest.raises(OSError, match="disk went away"):
            next(feed)
