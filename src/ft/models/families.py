"""The model families ft ships, registered in one place: a new family is a folder
under `ft/models/` plus one line here (and its name in `ft.models.family_names`)."""

from ft.models.family_bundle import register_family
from ft.models.llama.family import LLAMA_FAMILY
from ft.models.mistral.family import MISTRAL_FAMILY
from ft.models.qwen2.family import QWEN2_FAMILY
from ft.models.qwen3.family import QWEN3_FAMILY

register_family(LLAMA_FAMILY)
register_family(QWEN2_FAMILY)
register_family(QWEN3_FAMILY)
register_family(MISTRAL_FAMILY)
