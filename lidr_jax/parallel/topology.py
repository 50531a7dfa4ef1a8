"""TPU topologies by name, and their devices without a TPU (for ahead-of-time compiles on any machine).

Two spellings are accepted: JAX's topology names (`v5e:2x4`, `v5p:2x2x1`, `v4:2x2x2`, `v6e:2x2`: chips
along each axis) and the slice names users type when they create a TPU (`v5e-8`, `v5litepod-16`,
`v6e-8`: chips; `v5p-8`, `v4-32`: TensorCores, two per chip). Both map to one `Topology` with the chip
count checked. `devices(topology)` asks libtpu (the `tpu` extra) for the topology's devices: no TPU, no
TPU VM metadata server and no network are needed, and libtpu's own warnings about them are kept quiet
by the environment `deviceless_environment` sets.

Chip figures (Google Cloud's published per-chip numbers: HBM, peak bfloat16 FLOP/s, HBM bandwidth) are
what estimates divide by; memory limits come from the compiler itself where it states them.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import sys
from importlib.util import find_spec

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    generation: str  # as in JAX's topology names: v4, v5e, v5p, v6e
    hbm_bytes: int
    peak_flops: float  # bfloat16 FLOP/s per chip
    hbm_bandwidth: float  # bytes/s per chip
    cores_in_name: int  # slice names count TensorCores (2 per chip: v4, v5p) or chips (1: v5e, v6e)
    host_chips: int  # chips per host in multi-host slices
    dims: int  # 3 for a 3-D torus (v4, v5p), else 2
    single_host_chips: int  # the most chips a one-host slice has (v5litepod-8 and v6e-8: one VM of 8)


CHIPS = {
    "v4": Chip("v4", 32 * GiB, 275e12, 1.2e12, 2, 4, 3, 4),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 8.19e11, 1, 4, 2, 8),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2.765e12, 2, 4, 3, 4),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1.64e12, 1, 4, 2, 8),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e"}

# The default chip grid of a slice of n chips (Google Cloud's slice shapes).
_GRIDS_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
_GRIDS_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8), 256: (4, 8, 8)}


class TopologyError(ValueError):
    """An unknown topology name, or a grid whose chip count does not match (one line)."""


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # JAX's spelling, e.g. v5p:2x2x1
    slice_name: str  # the slice a user creates, e.g. v5p-8
    chip: Chip
    grid: tuple[int, ...]

    @property
    def chips(self) -> int:
        return math.prod(self.grid)

    @property
    def hosts(self) -> int:
        """Hosts of the slice: one up to `single_host_chips` chips (v5litepod-8 is one VM of 8 chips), else
        `host_chips` chips each (v5litepod-16: four hosts of four)."""
        return 1 if self.chips <= self.chip.single_host_chips else self.chips // self.chip.host_chips


def known_names() -> str:
    slices = [f"{g}-{n * c.cores_in_name}" for g, c in CHIPS.items() for n in (_GRIDS_3D if c.dims == 3 else _GRIDS_2D)]
    return "JAX names like v5e:2x4, v5p:2x2x1, v4:2x2x2, v6e:2x2; slice names " + ", ".join(slices)


def parse(name: str) -> Topology:
    """`v5e:2x4` or `v5e-8` (or `v5litepod-8`) -> Topology; TopologyError with the known names otherwise."""
    text = name.strip().lower()
    m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+){1,2})", text)
    if m:
        gen = _ALIASES.get(m.group(1), m.group(1))
        grid = tuple(int(x) for x in m.group(2).split("x"))
        chip = CHIPS.get(gen)
        if chip is None or len(grid) != chip.dims or 0 in grid:
            raise TopologyError(f"unknown TPU topology {name!r}: known are {known_names()}")
        cores = math.prod(grid) * chip.cores_in_name
        return Topology(f"{gen}:{'x'.join(map(str, grid))}", f"{gen}-{cores}", chip, grid)
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
    gen = _ALIASES.get(m.group(1), m.group(1)) if m else None
    if gen not in CHIPS:
        raise TopologyError(f"unknown TPU topology {name!r}: known are {known_names()}")
    chip, count = CHIPS[gen], int(m.group(2))
    chips, rest = divmod(count, chip.cores_in_name)
    grid = (_GRIDS_3D if chip.dims == 3 else _GRIDS_2D).get(chips) if not rest else None
    if grid is None:
        raise TopologyError(f"unknown TPU slice {name!r}: known are {known_names()}")
    return Topology(f"{gen}:{'x'.join(map(str, grid))}", f"{gen}-{count}", chip, grid)


def deviceless_environment(topology: Topology) -> dict[str, str]:
    """What libtpu reads at start-up, set so that it starts without a TPU or a metadata server (and says
    nothing about them). Values already set by the user are kept."""
    return {
        "TPU_SKIP_MDS_QUERY": "1",
        "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",  # a second process (a test, a plan) may start libtpu too
        "TPU_ACCELERATOR_TYPE": topology.slice_name,
        "TPU_WORKER_HOSTNAMES": "localhost",
        "TPU_WORKER_ID": "0",
        "TPU_MIN_LOG_LEVEL": "3",
        "TPU_STDERR_LOG_LEVEL": "3",
    }


def devices(topology: Topology) -> list:
    """The devices of `topology` to build a Mesh on and compile for (jax.experimental.topologies)."""
    if find_spec("libtpu") is None:
        raise TopologyError("compiling for a TPU needs libtpu: pip install 'lidr_jax[tpu]' (no TPU needed)")
    for key, value in deviceless_environment(topology).items():
        os.environ.setdefault(key, value)
    from jax.experimental import topologies  # after the environment: libtpu reads it when it starts

    # v4 chips hold two TensorCores that JAX shows as one device ("megacore"), as on a real v4 VM
    extra = {"chip_config_name": "megacore"} if topology.chip.generation == "v4" else {}
    if topology.hosts == 1 and topology.chips > topology.chip.host_chips:  # JAX would lay out 4 chips a host
        extra["chips_per_host_bounds"] = (*topology.grid, 1)[:3]
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology.name, **extra).devices)


def host_devices(topology: Topology, slice_devices: list) -> list:
    """Devices to compile one host's own programs for (generation decodes on each host alone): those of
    a single-host topology shaped like the first host's chips. Compiled over a host's devices taken from a
    multi-host topology, libtpu refuses collectives among them ("Unexpected device_id 4 in replica
    group"), as their ids are not 0..n-1."""
    first = [d for d in slice_devices if d.process_index == slice_devices[0].process_index]
    if len(first) == len(slice_devices):
        return slice_devices
    span = [max(c) - min(c) + 1 for c in zip(*(d.coords for d in first))][: topology.chip.dims]
    return devices(parse(f"{topology.chip.generation}:{'x'.join(map(str, span))}"))


def skip_absent_tpu(environ=os.environ) -> None:
    """With libtpu installed (the `tpu` extra, which `plan` needs) on a machine without a TPU, JAX probes
    for one when it starts: seconds of waiting and libtpu's errors on stderr, for every command. Unless
    the user chose platforms (JAX_PLATFORMS), leave the TPU out where the machine has no TPU device
    file (TPU VMs have /dev/accel* or /dev/vfio/N). Called by `import lidr_jax`, before JAX starts."""
    if "JAX_PLATFORMS" in environ or find_spec("libtpu") is None:
        return
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return
    platforms = "cuda,cpu" if glob.glob("/dev/nvidia[0-9]*") else "cpu"
    environ["JAX_PLATFORMS"] = platforms
    jax = sys.modules.get("jax")
    if jax is not None:  # imported before lidr_jax: JAX read the environment already, its backends start later
        jax.config.update("jax_platforms", platforms)
