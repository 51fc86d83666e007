"""The Qwen3 dense family: config, archs and model (`model`), HF interop and the
bundle that registers it (`family`)."""
