"""Asset cards: YAML documents that name models, tokenizers and datasets.

    from ft.assets import load_card
    card = load_card("llama3_2_1b")
    card.get("model_arch"), card.path("checkpoint")

    from ft.assets import resolve_card_or_path
    found = resolve_card_or_path("./data/train.jsonl", what="dataset")  # a Path
    found = resolve_card_or_path("ft_default_sft", what="dataset")      # an AssetCard
"""

from ft.assets.resolve import is_explicit_path, resolve_card_or_path
from ft.assets.store import (
    AssetCard,
    AssetStore,
    asset_dirs,
    read_card_file,
    system_asset_dirs,
    user_asset_dir,
)


def load_card(name: str) -> AssetCard:
    """The merged card `name` from the user and system directories."""
    return AssetStore.default().load(name)


def card_types(card: AssetCard) -> list[str]:
    """What a card can be used as: model, tokenizer, dataset."""
    types = []
    if card.get("model_family") or card.get("model_arch"):
        types.append("model")
    if card.get("tokenizer_family") or card.get("tokenizer"):
        types.append("tokenizer")
    if card.get("dataset_family") or card.get("data"):
        types.append("dataset")
    return types


def list_cards(kind: str | None = None) -> list[AssetCard]:
    """Every card (merged), optionally only those usable as `kind`."""
    store = AssetStore.default()
    cards = [store.load(name) for name in store.names()]
    return [card for card in cards if kind is None or kind in card_types(card)]


__all__ = [
    "AssetCard",
    "AssetStore",
    "asset_dirs",
    "card_types",
    "is_explicit_path",
    "list_cards",
    "load_card",
    "read_card_file",
    "resolve_card_or_path",
    "system_asset_dirs",
    "user_asset_dir",
]
