"""The model families ft ships, registered in one place: a new family is a folder
under `ft/models/` plus one line here."""

from ft.models.family import register_family
from ft.models.llama.family import LLAMA_FAMILY

register_family(LLAMA_FAMILY)
