"""Cloud TPU slice names -> the topology JAX's ahead-of-time compilation needs (no TPU)."""

import re

import pytest

from sharding.topology import TopologyError, parse


@pytest.mark.parametrize("name, topology, chips, host_bounds", [
    ("v4-8", "v4:2x2x1", 4, (2, 2, 1)),
    ("v4-32", "v4:2x2x4", 16, (2, 2, 1)),
    ("v4-512", "v4:4x8x8", 256, (2, 2, 1)),
    ("v4-4096", "v4:8x16x16", 2048, (2, 2, 1)),
    ("v5p-128", "v5p:4x4x4", 64, (2, 2, 1)),
    ("v5p-256", "v5p:4x4x8", 128, (2, 2, 1)),
    ("v5e-1", "v5e:1x1", 1, (1, 1, 1)),
    ("v5e-8", "v5e:2x4", 8, (2, 4, 1)),
    ("v5e-16", "v5e:4x4", 16, (2, 2, 1)),
    ("v5litepod-128", "v5e:8x16", 128, (2, 2, 1)),
    ("V5E-256", "v5e:16x16", 256, (2, 2, 1)),
    ("v6e-64", "v6e:8x8", 64, (2, 2, 1)),
    ("v5e:16x16", "v5e:16x16", 256, (2, 2, 1)),
    ("v5:4x4x12", "v5p:4x4x12", 192, (2, 2, 1)),
])
def test_accelerator_types_and_topologies_name_the_same_slices(name, topology, chips,
                                                               host_bounds):
    tpu = parse(name)
    assert (tpu.topology_name, tpu.chips, tpu.chips_per_host_bounds) == (
        topology, chips, host_bounds)
    assert parse(tpu.topology_name) == tpu
    if not name.startswith("v5:"):  # v5p-384 (4x4x12) is named by its topology only
        assert parse(tpu.accelerator_type) == tpu


@pytest.mark.parametrize("name, message", [
    ("v7x-8", "unknown TPU generation 'v7x'"),
    ("tpu", "not a TPU slice name"),
    ("v5e-3", "not a standard v5e slice size; give its topology instead, e.g. v5e:4x4"),
    ("v4-2", "the smallest v4 slice has 4 chips (v4-8)"),
    ("v4-7", "the number must be even"),
    ("v5e:4x4x4", "a v5e topology has 2 positive sizes"),
    ("v5p:4x0x4", "a v5p topology has 3 positive sizes"),
])
def test_a_name_that_is_no_slice_is_refused_saying_what_is_expected(name, message):
    with pytest.raises(TopologyError, match=re.escape(message)):
        parse(name)
