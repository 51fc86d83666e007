"""`resolve_compile`: what `torch_compile: auto | true | false` means on a device.

`auto` compiles on CUDA, where per-block compilation is the single biggest speed-up
of a training step, and stays eager elsewhere (on a CPU, compiling costs more
than the short runs there gain). The choice is always logged, with why, so a slow
run never hides that it ran eager.
"""

from __future__ import annotations

import logging
from typing import Literal

log = logging.getLogger("ft")

CompileSetting = Literal["auto"] | bool


def resolve_compile(setting: CompileSetting, device_type: str) -> bool:
    """Whether to compile the model's blocks on a `device_type` device; logs the choice."""
    if setting == "auto":
        enabled = device_type == "cuda"
        why = f"torch_compile=auto on {device_type}"
    else:
        enabled = bool(setting)
        why = f"torch_compile={str(setting).lower()}"
    if enabled:
        log.info("torch.compile: on (%s); the first steps include compilation and are reported as warm-up", why)
    else:
        hint = "; set torch_compile=true for speed on a GPU" if device_type == "cuda" else ""
        log.info("torch.compile: off (%s)%s", why, hint)
    return enabled
