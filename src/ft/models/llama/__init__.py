"""The Llama family: config and archs (`model`), checkpoint conversion
(`checkpoint`), HF config (`hf`), and the bundle that registers it (`family`)."""
