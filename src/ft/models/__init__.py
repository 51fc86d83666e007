"""Models of every registered family (`ft.models.family`): `build_model` (an arch on
any device, meta by default), `create_model` (the one build path), `load_model` (a
card name or a checkpoint path -> a model with weights) and
`model_flops_per_token` (for MFU)."""

from ft.lazy_exports import lazy_exports

# Imported on first use, so that `ft.models.cli` and `ft.models.family_names` (read by `ft --help`) import
# without torch.
__getattr__ = lazy_exports(__name__, {
    "ft.models.build": ("ModelSource", "build_model", "create_model", "load_model", "model_config_from_card",
                        "require_checkpoint", "resolve_model"),
    "ft.models.family": ("ModelFamily", "family_of", "find_arch", "get_family", "model_flops_per_token",
                         "register_family"),
})

__all__ = [
    "ModelFamily",
    "ModelSource",
    "build_model",
    "create_model",
    "family_of",
    "find_arch",
    "get_family",
    "load_model",
    "model_config_from_card",
    "model_flops_per_token",
    "register_family",
    "require_checkpoint",
    "resolve_model",
]
