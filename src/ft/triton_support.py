"""Where ft's own Triton kernels can run: CUDA with Triton installed, or Triton's CPU
interpreter (TRITON_INTERPRET=1, what the CPU tests use)."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


def triton_usable(device: torch.device) -> bool:
    """Whether a Triton kernel can run on `device`."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return _triton_installed()


@functools.cache
def _triton_installed() -> bool:
    # Asked by every eager call of an op (each layer, each step): look it up once.
    return importlib.util.find_spec("triton") is not None
