"""Ahead-of-time compiles for TPU slices on this CPU host: communication counted from the
optimized HLO, memory against HBM, refusals with suggestions, saved executables' keys."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import configs
import model
from sharding import topology
from train import aot
from train.compile import chips, executables
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


# The project's train step, compiled for a v5e 2x2 slice as `python -m train.aot` does.
# A vocabulary large enough for the output projection to be half the parameters, and
# loss chunks small enough for 16 trips of the loop on each chip: were the projection
# gathered (or its gradient reduced) on every trip, the bytes would be several times
# the minimum.
_FSDP_TINY = ["model.vocab_size=4096", "model.embed_dim=128", "model.num_layers=2",
              "model.num_heads=4", "model.head_dim=32", "model.mlp_dim=384",
              "data.seq_len=128", "train.batch_size=16", "model.loss_chunk_tokens=32",
              "mesh.data=1", "mesh.fsdp=-1"]


@pytest.fixture(scope="module")
def fsdp_tiny():
    return aot.compile_for_slice(configs.load("tiny", _FSDP_TINY), topology.parse("v5e-4"))


@pytest.mark.slow
def test_the_train_step_moves_at_most_its_fsdp_minimum(fsdp_tiny):
    params = sum(x.size for x in jax.tree.leaves(model.abstract_params(fsdp_tiny.config.model)))
    minimum = 3 * 2 * params  # bf16 parameters gathered twice, gradient scattered once
    ici = fsdp_tiny.communication.ici
    total = fsdp_tiny.communication.total("ici").bytes
    assert dict(fsdp_tiny.mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 1}
    assert total <= 1.25 * minimum, {k: (t.count, t.bytes) for k, t in ici.items()}
    # every weight is gathered, and the gradients are reduce-scattered, not all-reduced
    assert ici["all-gather"].bytes >= 0.9 * 2 * params * (fsdp_tiny.chips - 1) / fsdp_tiny.chips
    assert ici["reduce-scatter"].bytes >= 0.5 * 2 * params
    assert ici["all-reduce"].bytes < 0.1 * 2 * params
    assert fsdp_tiny.communication.total("dcn").count == 0


@pytest.mark.slow
def test_the_report_says_what_a_chip_holds_and_moves(fsdp_tiny):
    lines = aot.describe(fsdp_tiny)
    text = "\n".join(lines)
    assert lines[0] == "slice: v5e-4 (v5e:2x2): 4 chips on 1 host(s)"
    assert "mesh {'data': 1, 'fsdp': 4, 'tensor': 1}" in lines[1]
    assert "attention splash, bfloat16" in lines[1]
    gib = fsdp_tiny.memory.total / 2**30
    assert f"total {gib:.2f} GiB of 15.75 GiB usable (16 GiB HBM): fits" in text
    assert re.search(r"compile time here: train step \d+\.\d s, eval step \d+\.\d s", text)
    assert re.search(r"ICI: all-gather \d+ x = [\d.]+ MiB; reduce-scatter", text)
    assert re.search(r"ICI total .* ms at 200\.0 GB/s", text)


@pytest.mark.slow
def test_a_saved_step_is_keyed_without_the_compiling_hosts_cpu(fsdp_tiny, tmp_path,
                                                               monkeypatch):
    path = aot.save(fsdp_tiny, tmp_path)
    assert path.parent == tmp_path / "train_steps" and path.stat().st_size > 0
    devices = list(fsdp_tiny.mesh.devices.flat)
    config = configs.to_dict(fsdp_tiny.config)
    assert path.stem == executables.key(config, devices)
    # the TPU VM that loads it has another CPU, no fake host devices, JAX_PLATFORMS unset
    monkeypatch.setattr(executables, "_cpu_flags", lambda: "flags: another cpu")
    monkeypatch.setenv("XLA_FLAGS", os.environ["XLA_FLAGS"].replace(
        "--xla_force_host_platform_device_count=8", "--xla_cpu_enable_fast_math=false"))
    platforms = jax.config.values["jax_platforms"]
    try:
        jax.config.update("jax_platforms", None)
        assert executables.key(config, devices) == path.stem
    finally:
        jax.config.update("jax_platforms", platforms)
    # what does change the TPU program still changes the key
    monkeypatch.setenv("LIBTPU_INIT_ARGS", "--xla_tpu_enable_windowed_einsum=false")
    assert executables.key(config, devices) != path.stem


# 2 layers of 8192 wide: 2.1 B parameters, 26 GB of weights and AdamW moments, which no
# v5e chip holds whole; split over the 4 chips they fit.
_TOO_BIG = ["--topology", "v5e-4", "--config", "tiny", "model.embed_dim=8192",
            "model.num_heads=64", "model.num_kv_heads=64", "model.head_dim=128",
            "model.mlp_dim=32768", "model.num_layers=2", "train.batch_size=4", "data.seq_len=128"]


@pytest.mark.slow
def test_a_step_that_cannot_fit_is_refused_with_compiled_suggestions(capsys):
    assert aot.main(_TOO_BIG) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    lines = err.splitlines()
    assert re.match(r"error: the train step (needs [\d.]+ GiB per device|does not fit)", lines[0])
    assert lines[1] == "what to change, best first (each compiled here for this slice):"
    # recomputing activations does not shrink the weights; splitting them over the chips
    # does; the batch (one row a chip) can be split no further
    assert re.match(r"  1\. model\.remat=full +does not fit: ", lines[2])
    assert re.match(r"  2\. mesh\.data=1 mesh\.fsdp=-1 +fits: [\d.]+ GiB a chip$", lines[3])
    assert len(lines) == 4


@pytest.mark.slow
def test_two_slices_compile_with_the_gradient_summed_over_dcn(capsys):
    assert aot.main(["--topology", "v5e-4", "--slices", "2", "--config", "tiny",
                     "mesh.data=1", "mesh.fsdp=-1", "mesh.dcn_data=2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("slice: v5e-4 x 2 slices (v5e:2x2): 8 chips on 2 host(s)\n")
    assert "mesh {'data': 2, 'fsdp': 4, 'tensor': 1}" in out
    assert re.search(r"\n  DCN: all-reduce \d+ x = [\d.]+ MiB", out)
    assert re.search(r"\n  DCN total [\d.]+ MiB, [\d.]+ MiB sent: [\d.]+ ms at 3\.1 GB/s", out)


def test_slices_without_dcn_ways_are_refused_naming_the_fields(capsys):
    assert aot.main(["--topology", "v5e-4", "--slices", "2", "--config", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "mesh.dcn_data (1) x mesh.dcn_fsdp (1) = 1" in err and "Traceback" not in err
