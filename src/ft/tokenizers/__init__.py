"""Tokenizers: the `Tokenizer` base class (`base`) and `load_tokenizer` (`loading`).

    tok = load_tokenizer("llama3_2_1b_instruct")        # a card
    tok = load_tokenizer("/ckpt/original/tokenizer.model")  # or a path
    ids = tok.encode("hello")

Families (`tokenizer_family` in a card, or `family=`; registered in
`ft.tokenizers.loading.TOKENIZER_FAMILIES`):

- `llama3`: a tiktoken BPE file (Meta's `tokenizer.model`: base64 token and rank
  per line) with the Llama 3 split pattern and 256 special tokens after the base
  vocabulary (`ft.tokenizers.llama3`).
- `llama2`: a SentencePiece model (`ft.tokenizers.sentencepiece`).
- `hf`: a Hugging Face `tokenizer.json` (`ft.tokenizers.hf`, needs `tokenizers`).

A card may set `use_eot: true` (instruct/chat models): then `encode_response`
ends a target with the end-of-turn token (`<|eot_id|>`) instead of EOS. Without a
card the switch is the `use_eot=` argument of `load_tokenizer`, else read from a
`tokenizer_config.json` beside the file (EOS `<|eot_id|>`, as `save_hf` writes it).
"""

from ft.tokenizers.base import Message, Tokenizer
from ft.tokenizers.loading import (
    TOKENIZER_FAMILIES,
    TokenizerFamily,
    find_tokenizer_file,
    guess_family,
    load_tokenizer,
)

__all__ = [
    "TOKENIZER_FAMILIES",
    "Message",
    "Tokenizer",
    "TokenizerFamily",
    "find_tokenizer_file",
    "guess_family",
    "load_tokenizer",
]
