"""The Qwen2 / Qwen2.5 family: config, archs and model (`model`), HF interop and
the bundle that registers it (`family`)."""
