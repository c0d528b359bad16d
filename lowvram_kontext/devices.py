"""Which device an edit runs on and in which dtype."""

from __future__ import annotations

import torch

from .errors import KontextError

COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
BF16_CAPABILITY = (8, 0)  # Ampere: the first GPUs with bf16 arithmetic


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU that has it (as the reference runs), float16 on older GPUs (Pascal, Turing: the
    models guard its overflows), float32 on a CPU (bf16 matmuls are slow there)."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= BF16_CAPABILITY else torch.float16


def compute_dtype(name: str, device: torch.device, compute: str = "auto") -> torch.dtype:
    """The dtype ``name`` (bfloat16, float16, float32) denotes; "auto" is ``default_dtype``, or float16
    on a GPU for ``--compute fp16``."""
    if name == "auto":
        return torch.float16 if compute == "fp16" and device.type == "cuda" else default_dtype(device)
    if name not in COMPUTE_DTYPES:
        raise KontextError(f"unknown compute dtype {name!r}: choose auto or one of {', '.join(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[name]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise KontextError("no CUDA GPU is available to this process")
    return torch.device(name)
