"""The one dtype table and `resolve_dtype`."""

import pytest
import torch

from ft.dtypes import DTYPES, resolve_dtype
from ft.errors import ConfigError


def test_names_and_auto():
    assert DTYPES == {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    assert resolve_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16


def test_unknown_dtype_names_the_key():
    with pytest.raises(ConfigError, match=r"config key 'save_model_dtype': unknown dtype 'fp8'; known: auto, float32"):
        resolve_dtype("fp8", torch.device("cpu"), key="save_model_dtype")


def test_recipes_still_import_the_table_from_lm_setup():
    from ft.recipes import lm_setup

    assert lm_setup.DTYPES is DTYPES and lm_setup.resolve_dtype is resolve_dtype
