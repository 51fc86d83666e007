"""The Llama family bundle: config and archs, model, checkpoint loading, HF export."""

from ft.models.llama.checkpoint import load_checkpoint, read_checkpoint_config
from ft.models.llama.hf import hf_config_dict, save_hf_model, save_hf_state_dict, write_hf_config
from ft.models.llama.model import (
    LLAMA_ARCHS,
    KVCache,
    Llama,
    LlamaConfig,
    LlamaRopeScaling,
    get_llama_arch,
    update_llama_config,
)

__all__ = [
    "KVCache",
    "LLAMA_ARCHS",
    "Llama",
    "LlamaConfig",
    "LlamaRopeScaling",
    "get_llama_arch",
    "hf_config_dict",
    "load_checkpoint",
    "read_checkpoint_config",
    "save_hf_model",
    "save_hf_state_dict",
    "update_llama_config",
    "write_hf_config",
]
