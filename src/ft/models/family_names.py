"""The model families ft ships, by name, readable without importing any family (or
torch): the CLI gives each family a `write_hf_config` verb from this list, so
`ft --help` starts at once. `ft.models.families` registers the families themselves;
a test checks that the two agree.
"""

from __future__ import annotations

import sys

# Family name -> one of its archs, the example in `ft <family> write_hf_config --help`.
SHIPPED_FAMILIES = {"llama": "ft_tiny", "qwen2": "qwen2_5_0_5b", "qwen3": "qwen3_0_6b", "mistral": "mistral_7b_v0_3"}


def family_names() -> dict[str, str]:
    """{family name: one of its archs} for the shipped families and any registered at
    run time (a test's, a plugin's)."""
    names = dict(SHIPPED_FAMILIES)
    # A family registered at run time exists only once the registry's module is loaded;
    # importing that module here would import torch.
    bundle = sys.modules.get("ft.models.family_bundle")
    if bundle is not None:
        for name, family in bundle.FAMILIES.items():
            names.setdefault(name, family.archs.names()[0])
    return names


__all__ = ["SHIPPED_FAMILIES", "family_names"]
