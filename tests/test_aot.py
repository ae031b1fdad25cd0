"""Ahead-of-time compiles for TPU slices on this CPU host: communication counted from the
optimized HLO, memory against HBM, refusals with suggestions, saved executables' keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sharding import topology
from train.compile import chips
from train.compile.communication import communication

KIB = 1024


def _fsdp_layers(slices: int, layers: int = 3, width: int = 512):
    """The gradient of a scan over `layers` fsdp-sharded weights gathered whole in each
    layer, on `slices` v5e 2x2 slices (fsdp 4 within a slice, data across)."""
    devices = chips.devices(topology.parse("v5e:2x2"), slices)
    mesh = Mesh(np.array(devices).reshape(slices, 4), ("data", "fsdp"))
    w = jax.ShapeDtypeStruct((layers, width, width), jnp.bfloat16,
                             sharding=NamedSharding(mesh, P(None, "fsdp", None)))
    x = jax.ShapeDtypeStruct((16 * slices, width), jnp.bfloat16,
                             sharding=NamedSharding(mesh, P(("data", "fsdp"), None)))

    def loss(w, x):
        def layer(h, w_layer):
            w_layer = jax.lax.with_sharding_constraint(w_layer, NamedSharding(mesh, P()))
            return jnp.tanh(h @ w_layer), None
        h, _ = jax.lax.scan(layer, x, w)
        return jnp.mean(h.astype(jnp.float32) ** 2)

    compiled = jax.jit(jax.grad(loss), out_shardings=w.sharding).lower(w, x).compile()
    return compiled, mesh


def test_fsdp_scan_gathers_each_layer_once_and_reduce_scatters_its_gradient():
    compiled, mesh = _fsdp_layers(slices=1)
    traffic = communication(compiled, chips.slice_of_device(list(mesh.devices.flat)))
    layer = 512 * 512 * 2
    # the forward's gathered weights are kept for the backward: 3 gathers, not 6
    assert (traffic.ici["all-gather"].count, traffic.ici["all-gather"].bytes) == (3, 3 * layer)
    assert (traffic.ici["reduce-scatter"].count,
            traffic.ici["reduce-scatter"].bytes) == (3, 3 * layer)
    assert traffic.ici["all-reduce"].count == 0
    assert traffic.total("dcn").count == 0
    # a ring over 4 chips sends 3/4 of each gathered or scattered array
    assert traffic.total("ici").sent_bytes == pytest.approx(6 * layer * 3 / 4)


def test_two_slices_reduce_the_gradient_shards_over_dcn():
    compiled, mesh = _fsdp_layers(slices=2)
    traffic = communication(compiled, chips.slice_of_device(list(mesh.devices.flat)))
    layer = 512 * 512 * 2
    assert traffic.ici["all-gather"].count == 3
    assert (traffic.ici["reduce-scatter"].count,
            traffic.ici["reduce-scatter"].bytes) == (3, 3 * layer)
    # each chip's quarter of each layer's gradient is summed with the other slice's
    assert (traffic.dcn["all-reduce"].count, traffic.dcn["all-reduce"].bytes) == (3, 3 * layer // 4)
    assert traffic.total("ici").count == 6


# An unrolled windowed-einsum loop as the TPU compiler writes it: the counter steps by 2
# up to 8 (4 trips), each trip one permute of its operand (the tuple's first element).
_UNROLLED = """\
HloModule m

%body (p: (u32[], bf16[64,128])) -> (u32[], bf16[64,128]) {
  %p = (u32[], bf16[64,128]{1,0}) parameter(0)
  %i = u32[] get-tuple-element(%p), index=0
  %x = bf16[64,128]{1,0} get-tuple-element(%p), index=1
  %cp = (bf16[64,128]{1,0}, bf16[64,128]{1,0}, u32[], u32[]) collective-permute-start(%x), \
channel_id=7, source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
  %d = bf16[64,128]{1,0} collective-permute-done(%cp)
  %two = u32[] constant(2)
  %next = u32[] add(%i, %two)
  ROOT %t = (u32[], bf16[64,128]{1,0}) tuple(%next, %d)
}

%cond (q: (u32[], bf16[64,128])) -> pred[] {
  %q = (u32[], bf16[64,128]{1,0}) parameter(0)
  %j = u32[] get-tuple-element(%q), index=0
  %limit = u32[] constant(8)
  ROOT %lt = pred[] compare(%j, %limit), direction=LT
}

ENTRY %main (a: bf16[64,128]) -> bf16[64,128] {
  %a = bf16[64,128]{1,0} parameter(0)
  %zero = u32[] constant(0)
  %start = u32[] copy(%zero)
  %init = (u32[], bf16[64,128]{1,0}) tuple(%start, %a)
  %w = (u32[], bf16[64,128]{1,0}) while(%init), condition=%cond, body=%body
  %g = bf16[256,128]{1,0} all-gather(%a), channel_id=8, replica_groups=[1,4]<=[4], \
dimensions={0}
  ROOT %r = bf16[64,128]{1,0} get-tuple-element(%w), index=1
}
"""


def test_unrolled_loop_trips_and_permute_operand_bytes():
    traffic = communication(_UNROLLED)
    assert traffic.ici["collective-permute"].count == 4
    assert traffic.ici["collective-permute"].bytes == 4 * 64 * 128 * 2
    assert (traffic.ici["all-gather"].count, traffic.ici["all-gather"].bytes) == (1, 64 * KIB)


def test_groups_spanning_slices_are_dcn():
    across = _UNROLLED.replace("[1,4]<=[4]", "[2,2]<=[2,2]T(1,0)")  # {0,2}, {1,3}
    traffic = communication(across, slice_of_device=[0, 0, 1, 1])
    assert traffic.dcn["all-gather"].count == 1
    assert traffic.ici["all-gather"].count == 0
    # the ring of permutes crosses slices too (pair 1 -> 2)
    assert traffic.dcn["collective-permute"].count == 4
    within = communication(_UNROLLED.replace("[1,4]<=[4]", "[2,2]<=[4]"), [0, 0, 1, 1])
    assert within.ici["all-gather"].count == 1
