"""The Mistral family: config, archs and model (`model`), HF interop and the bundle
that registers it (`family`)."""
