"""`ft assets list` and `ft assets show NAME`."""

from __future__ import annotations

import argparse

import yaml
from rich.console import Console
from rich.table import Table

from ft.assets import AssetStore, asset_dirs, card_types, list_cards, load_card
from ft.cli.command import Command


def _add_list_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--type", choices=["model", "tokenizer", "dataset"], help="only cards of this type")


def _run_list(args: argparse.Namespace) -> int:
    cards = list_cards(args.type)
    table = Table(title=f"asset cards ({len(cards)})", show_lines=False)
    for column in ("name", "type", "family", "arch", "source"):
        table.add_column(column, overflow="fold")
    for card in cards:
        family = card.get("model_family") or card.get("dataset_family") or card.get("tokenizer_family") or ""
        table.add_row(
            card.name,
            ",".join(card_types(card)),
            family,
            card.get("model_arch", ""),
            str(card.sources[0].file) if card.sources else "",
        )
    Console(width=160).print(table)
    print("searched: " + ", ".join(str(d) for d in asset_dirs()))
    store = AssetStore(asset_dirs())
    for raw in store.orphan_overlays():
        print(f"warning: {store.orphan_message(raw)}")
    return 0


def _add_show_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="card name")


def _run_show(args: argparse.Namespace) -> int:
    card = load_card(args.name)
    print(yaml.safe_dump(card.fields, sort_keys=False), end="")
    print("# merged from (first overrides later):")
    for source in card.sources:
        print(f"#   {source.name}: {source.file}")
    return 0


LIST_COMMAND = Command(help="list the asset cards", add_arguments=_add_list_arguments, run=_run_list)
SHOW_COMMAND = Command(help="show a merged asset card and the files it came from", add_arguments=_add_show_arguments, run=_run_show)
