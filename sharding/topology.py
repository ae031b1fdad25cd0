"""Cloud TPU slices by the names users type, as JAX's topology descriptions need them.

Two spellings are accepted: Google's accelerator types (`v4-32`, `v5p-128`, `v5e-256` or
`v5litepod-256`, `v6e-64`; the number counts TensorCores on v4 and v5p, two a chip, and
chips on v5e and v6e, as Google counts them) and JAX's own topology names (`v5e:16x16`,
`v5p:4x4x4`: chips along each axis of the slice's torus).
"""

from __future__ import annotations

import dataclasses
import math
import re


class TopologyError(ValueError):
    """A slice name that is not a Cloud TPU slice this stack knows."""


@dataclasses.dataclass(frozen=True)
class Generation:
    name: str
    """As JAX's topology names spell it: v4, v5p, v5e, v6e."""
    axes: int
    """2 (a 2-D torus of chips: v5e, v6e) or 3 (v4, v5p)."""
    cores_per_chip: int
    """TensorCores a chip, as its accelerator-type number counts them."""
    chip_config: str
    """JAX's chip configuration: "megacore" runs a chip's two cores as one device."""


GENERATIONS = {g.name: g for g in (
    Generation("v4", axes=3, cores_per_chip=2, chip_config="megacore"),
    Generation("v5p", axes=3, cores_per_chip=2, chip_config="megacore"),
    Generation("v5e", axes=2, cores_per_chip=1, chip_config="default"),
    Generation("v6e", axes=2, cores_per_chip=1, chip_config="default"),
)}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}


@dataclasses.dataclass(frozen=True)
class Slice:
    generation: Generation
    shape: tuple[int, ...]
    """Chips along each axis."""

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def topology_name(self) -> str:
        """JAX's name of it, e.g. "v5e:16x16"."""
        return f"{self.generation.name}:{'x'.join(map(str, self.shape))}"

    @property
    def accelerator_type(self) -> str:
        """Google's name of it, e.g. "v5p-128"."""
        return f"{self.generation.name}-{self.chips * self.generation.cores_per_chip}"

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        """Chips of one host along each axis: 4 a host (2x2), except the single-host v5e and
        v6e slices of 1 and 8 chips."""
        if self.generation.axes == 2 and self.chips in (1, 8):
            return (1, 1, 1) if self.chips == 1 else (2, 4, 1)
        return (2, 2, 1)


def parse(name: str) -> Slice:
    """The slice `name` (an accelerator type or a JAX topology name) stands for."""
    text = name.strip().lower()
    if ":" in text:
        return _from_topology_name(name, *text.split(":", 1))
    match = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
    if not match:
        raise TopologyError(f"{name!r} is not a TPU slice name: {_expected()}")
    generation = _generation(name, match.group(1))
    count = int(match.group(2))
    if count % generation.cores_per_chip:
        raise TopologyError(f"{name!r}: {generation.name} slices count {generation.cores_per_chip}"
                            " cores a chip; the number must be even")
    return Slice(generation, _standard_shape(name, generation, count //
                                             generation.cores_per_chip))


def _from_topology_name(name: str, prefix: str, dims: str) -> Slice:
    generation = _generation(name, "v5p" if prefix == "v5" else prefix)
    try:
        shape = tuple(int(d) for d in dims.split("x"))
    except ValueError:
        shape = ()
    if len(shape) != generation.axes or min(shape, default=0) < 1:
        raise TopologyError(f"{name!r}: a {generation.name} topology has {generation.axes} "
                            f"positive sizes, e.g. {_example(generation)}")
    return Slice(generation, shape)


def _generation(name: str, prefix: str) -> Generation:
    generation = GENERATIONS.get(ALIASES.get(prefix, prefix))
    if generation is None:
        raise TopologyError(f"{name!r}: unknown TPU generation {prefix!r}; {_expected()}")
    return generation


def _standard_shape(name: str, generation: Generation, chips: int) -> tuple[int, ...]:
    """The torus Google builds for a slice of `chips` chips (powers of two)."""
    if chips < 1 or chips & (chips - 1):
        raise TopologyError(f"{name!r}: not a standard {generation.name} slice size; give its "
                            f"topology instead, e.g. {_example(generation)}")
    if generation.axes == 2:
        short = 1 << (chips.bit_length() - 1) // 2
        return (short, chips // short)
    if chips < 8:
        if chips != 4:
            raise TopologyError(f"{name!r}: the smallest {generation.name} slice has 4 chips "
                                f"({generation.name}-{4 * generation.cores_per_chip})")
        return (2, 2, 1)
    shape = [2, 2, 2]
    axis = 2
    while math.prod(shape) < chips:  # doubled last axis first: 2x2x4, 2x4x4, 4x4x4, 4x4x8
        shape[axis] *= 2
        axis = (axis - 1) % 3
    return tuple(shape)


def _example(generation: Generation) -> str:
    return f"{generation.name}:{'x'.join(['4'] * generation.axes)}"


def _expected() -> str:
    return ("expected an accelerator type such as v4-32, v5p-128, v5e-256 (v5litepod-256) or "
            "v6e-64, or a topology such as v5e:16x16 or v5p:4x4x4")
