"""The dtype names users type (`dtype=bfloat16`, `--dtype float16`), without torch, so
the CLI can offer them as choices before torch is imported. `ft.dtypes.DTYPES` maps
each to its torch dtype."""

DTYPE_NAMES = ("float32", "bfloat16", "float16")

__all__ = ["DTYPE_NAMES"]
