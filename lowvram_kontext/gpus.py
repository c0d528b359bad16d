"""The consumer GPUs people run this on: memory, arithmetic, memory bandwidth and host link, per card.

``plan --gpu NAME`` plans for a card of this table; for the card in the machine the table supplies
what the short calibration (``card_speed``) does not measure. Figures are NVIDIA's public
specifications (product pages and the Pascal, Turing, Ampere, Ada and Blackwell architecture
whitepapers), reference boost clocks:

- ``tflops``: dense half-precision matrix throughput with float32 accumulation, which is how PyTorch
  multiplies fp16 and bf16 matrices: the tensor-core figure "with FP32 accumulate" (half the fp16-
  accumulate figure on GeForce cards), and the FP32 rate on cards without tensor cores (Pascal,
  GTX 16xx), where cuBLAS runs such products on the FP32 units.
- ``memory_gbps``: memory bandwidth; dequantization is bound by it.
- ``pcie``: (generation, lanes) of the card's own link; the host board may offer less.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from .errors import KontextError

# Usable pinned host-to-device rate per PCIe lane and generation, GB/s: the raw rate (0.985, 1.97,
# 3.94 GB/s per lane for 3.0, 4.0, 5.0) less ~20% for protocol overhead, as measured copies reach.
_LANE_GBPS = {3: 0.79, 4: 1.58, 5: 3.15}


@dataclass(frozen=True)
class GpuSpec:
    """One card model: VRAM (GiB as sold), compute capability, number formats, speeds, PCIe link."""

    name: str
    vram_gib: float
    tflops: float
    memory_gbps: float
    capability: tuple[int, int]
    pcie: tuple[int, int]
    tensor_cores: bool = True

    @property
    def bf16(self) -> bool:
        return self.capability >= (8, 0)

    @property
    def fp8(self) -> bool:
        return self.capability >= (8, 9)

    @property
    def int8_tensor(self) -> bool:
        """Integer tensor-core matmuls (``torch._int_mm``): Turing RTX cards and later."""
        return self.tensor_cores and self.capability >= (7, 5)

    @property
    def compute_dtype(self) -> str:
        return "bfloat16" if self.bf16 else "float16"

    @property
    def link_gbps(self) -> float:
        generation, lanes = self.pcie
        return _LANE_GBPS[generation] * lanes


def _cards(
    capability: tuple[int, int], pcie: tuple[int, int], *rows: tuple, tensor_cores: bool = True
) -> list[GpuSpec]:
    return [GpuSpec(*row, capability=capability, pcie=pcie, tensor_cores=tensor_cores) for row in rows]


# (name, VRAM GiB, TFLOPS, memory GB/s) per family.
GPUS: tuple[GpuSpec, ...] = tuple(
    _cards((6, 1), (3, 16),  # Pascal: no tensor cores, fp16 products on the FP32 units
        ("GTX 1060 3GB", 3, 3.9, 192), ("GTX 1060 6GB", 6, 4.4, 192), ("GTX 1070", 8, 6.5, 256),
        ("GTX 1070 Ti", 8, 8.2, 256), ("GTX 1080", 8, 8.9, 320), ("GTX 1080 Ti", 11, 11.3, 484),
        tensor_cores=False,
    )
    + _cards((7, 5), (3, 16),  # Turing without tensor cores
        ("GTX 1650", 4, 3.0, 128), ("GTX 1650 Super", 4, 4.4, 192), ("GTX 1660", 6, 5.0, 192),
        ("GTX 1660 Super", 6, 5.0, 336), ("GTX 1660 Ti", 6, 5.4, 288),
        tensor_cores=False,
    )
    + _cards((7, 5), (3, 16),  # Turing RTX
        ("RTX 2060", 6, 25.8, 336), ("RTX 2060 12GB", 12, 28.7, 336), ("RTX 2060 Super", 8, 28.7, 448),
        ("RTX 2070", 8, 29.9, 448), ("RTX 2070 Super", 8, 36.3, 448), ("RTX 2080", 8, 40.3, 448),
        ("RTX 2080 Super", 8, 44.6, 496), ("RTX 2080 Ti", 11, 53.8, 616),
    )
    + _cards((8, 6), (4, 8), ("RTX 3050", 8, 18.2, 224))  # Ampere
    + _cards((8, 6), (4, 16),
        ("RTX 3060", 12, 25.5, 360), ("RTX 3060 8GB", 8, 25.5, 240), ("RTX 3060 Ti", 8, 32.4, 448),
        ("RTX 3070", 8, 40.6, 448), ("RTX 3070 Ti", 8, 43.5, 608), ("RTX 3080", 10, 59.5, 760),
        ("RTX 3080 12GB", 12, 61.3, 912), ("RTX 3080 Ti", 12, 68.2, 912), ("RTX 3090", 24, 71.2, 936),
        ("RTX 3090 Ti", 24, 80.0, 1008),
    )
    + _cards((8, 9), (4, 8),  # Ada
        ("RTX 4060", 8, 30.2, 272), ("RTX 4060 Ti", 8, 44.2, 288), ("RTX 4060 Ti 16GB", 16, 44.2, 288),
    )
    + _cards((8, 9), (4, 16),
        ("RTX 4070", 12, 58.3, 504), ("RTX 4070 Super", 12, 71.0, 504), ("RTX 4070 Ti", 12, 80.2, 504),
        ("RTX 4070 Ti Super", 16, 88.2, 672), ("RTX 4080", 16, 97.5, 717), ("RTX 4080 Super", 16, 104.4, 736),
        ("RTX 4090", 24, 165.2, 1008),
    )
    + _cards((12, 0), (5, 8),  # Blackwell
        ("RTX 5060", 8, 38.4, 448), ("RTX 5060 Ti", 8, 47.4, 448), ("RTX 5060 Ti 16GB", 16, 47.4, 448),
    )
    + _cards((12, 0), (5, 16),
        ("RTX 5070", 12, 61.7, 672), ("RTX 5070 Ti", 16, 87.9, 896), ("RTX 5080", 16, 112.6, 960),
        ("RTX 5090", 32, 209.5, 1792),
    )
)  # fmt: skip

# The GPU the planner's time model was measured on (DESIGN.md, "Measuring"): H200, bf16 dense
# 989 TFLOPS, HBM3e 4.8 TB/s, PCIe 5.0 x16.
REFERENCE = GpuSpec("H200", 141, 989.0, 4800, capability=(9, 0), pcie=(5, 16))
# What ``card_speed``'s calibration measures on the reference in bf16 (TFLOPS): the planner's times
# scale by this over a card's own calibrated rate, so on the reference they are its measured times.
REFERENCE_CALIBRATED_TFLOPS = 693.0  # bench/results/calibration-h200.txt: 694.6 and 691.7
# A table card without a calibration is assumed to reach the same share of its specified rate.
REFERENCE_EFFICIENCY = REFERENCE_CALIBRATED_TFLOPS / REFERENCE.tflops


def _key(name: str) -> str:
    """A card name reduced for matching: lower case, no vendor words, no spaces ("rtx2060super")."""
    name = re.sub(r"\b(nvidia|geforce|laptop gpu)\b", " ", name.lower())
    return re.sub(r"[^a-z0-9]", "", name)


_BY_KEY = {_key(spec.name): spec for spec in GPUS}


def find_gpu(name: str) -> GpuSpec:
    """The table's card called ``name`` ("RTX 2060", "rtx2060", "NVIDIA GeForce RTX 2060 SUPER"...).

    A name matching no card, or several equally well, is a KontextError listing the closest names.
    """
    key = _key(name)
    if key in _BY_KEY:
        return _BY_KEY[key]
    # "GTX 1060": its 3 GB and 6 GB models; "1080 Ti": the GTX one
    longer = [k for k in _BY_KEY if key and (k.startswith(key) or k.endswith(key))]
    if len(longer) == 1:
        return _BY_KEY[longer[0]]
    close = list(dict.fromkeys(longer + difflib.get_close_matches(key, _BY_KEY, n=4, cutoff=0.6)))
    if close:
        raise KontextError(f"unknown GPU {name!r}; close names: {', '.join(_BY_KEY[k].name for k in close)}")
    raise KontextError(f"unknown GPU {name!r}; known cards: {', '.join(spec.name for spec in GPUS)}")


def known_gpu(device_name: str) -> GpuSpec | None:
    """The table's entry for the name a driver reports (e.g. "NVIDIA GeForce RTX 3060"), or None."""
    return _BY_KEY.get(_key(device_name))
