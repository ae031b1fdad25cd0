"""The large presets split their batch over the TPU slices they are meant for; a batch that
cannot be split is a ConfigError naming it, the ways and the mesh."""

import jax
import pytest
from jax.experimental import topologies

import configs
import sharding
from sharding import topology


def _slice_devices(name: str, num_slices: int = 1) -> list[jax.Device]:
    """The chips of a Cloud TPU slice, from libtpu's compiler (no TPU needed)."""
    tpu = topology.parse(name)
    return topologies.get_topology_desc(
        platform="tpu", topology_name=tpu.topology_name,
        chip_config_name=tpu.generation.chip_config,
        chips_per_host_bounds=tpu.chips_per_host_bounds, num_slices=num_slices).devices


@pytest.mark.parametrize("preset, slice_name, slices, overrides, ways", [
    ("llama-1b", "v5e-16", 1, (), 16),
    ("llama-1b", "v5e-16", 2, ("mesh.dcn_data=2",), 32),
    ("llama-7b", "v5e-256", 1, (), 256),
    ("llama-7b", "v5p-128", 1, (), 64),
])
def test_large_presets_split_their_batch_over_their_slices(preset, slice_name, slices,
                                                           overrides, ways):
    config = configs.load(preset, list(overrides))
    mesh = sharding.make_mesh(config.mesh, _slice_devices(slice_name, slices))
    assert sharding.batch_ways(mesh, config.mesh.rules) == ways
    sharding.check_batch(config, mesh)  # no error
    assert config.train.batch_size % ways == 0


def test_a_batch_that_cannot_be_split_names_the_field_the_ways_and_the_mesh():
    config = configs.load("llama-1b", ["train.batch_size=8"])
    mesh = sharding.make_mesh(config.mesh, _slice_devices("v5e-16"))
    with pytest.raises(configs.ConfigError,
                       match=r"train.batch_size \(8\) must be a multiple of the 16 ways the "
                             r"batch is split over the mesh \{'data': 1, 'fsdp': 16, "
                             r"'tensor': 1\}; e.g. train.batch_size=16"):
        sharding.check_batch(config, mesh)
    config = configs.load("llama-1b", ["train.batch_size=48", "train.microbatches=2"])
    with pytest.raises(configs.ConfigError,
                       match=r"\(48\) .* 16 ways .* times train.microbatches \(2\); "
                             r"e.g. train.batch_size=64"):
        sharding.check_batch(config, mesh)
