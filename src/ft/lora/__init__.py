"""LoRA and QLoRA: low-rank adapters on a frozen base, saved in the PEFT format.

- `config.LoraConfig`: the `lora` section of a recipe config;
- `layers.LoraLinear`: an `nn.Linear` with `lora_A` / `lora_B` children, so the base
  weight keeps its HF name (`...q_proj.weight`) and the adapters get PEFT's
  (`...q_proj.lora_A.weight`);
- `apply.apply_lora`: freeze the base and inject adapters by HF module name (on the
  meta device, before parallelization); `apply.init_lora_weights` after loading;
- `peft_io`: `adapter_config.json` + `adapter_model.safetensors` as PEFT writes them;
- `merge`: base checkpoint + adapter -> a merged HF directory;
- `quant`: NF4 base weights through torchao (QLoRA), imported lazily.
"""

from ft.lazy_exports import lazy_exports

# Imported on first use, so that `ft.lora.config` (a recipe config section) imports without torch.
__getattr__ = lazy_exports(__name__, {
    "ft.lora.apply": ("apply_lora", "init_lora_weights", "lora_state_dict", "trainable_parameters"),
    "ft.lora.config": ("LoraConfig", "check_lora_config"),
    "ft.lora.layers": ("LoraLinear",),
})

__all__ = [
    "LoraConfig", "LoraLinear", "apply_lora", "check_lora_config", "init_lora_weights", "lora_state_dict",
    "trainable_parameters",
]
