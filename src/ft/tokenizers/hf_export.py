"""Building Hugging Face `tokenizer.json` files from tiktoken ranks and SentencePiece models.

transformers and vLLM read `tokenizer.json` (the `tokenizers` package's format).
Both conversions are exact, not approximate:

- tiktoken merges, at each step, the adjacent pair whose concatenation has the
  lowest rank. A BPE whose merge list holds every split `(a, b)` of every token
  (with `a`, `b` in the vocabulary), ordered by the rank of `a + b`, does the same.
- SentencePiece BPE merges the adjacent pair whose concatenation has the highest
  score; the same construction ordered by descending score reproduces it.

Needs the optional `tokenizers` package (`pip install 'ft[hf]'`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ft.errors import FtError

if TYPE_CHECKING:
    import tokenizers


def _import_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise FtError(
            "writing a Hugging Face tokenizer.json needs the `tokenizers` package: pip install 'ft[hf]'"
        ) from None
    return tokenizers


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _merges(ranks: dict[Any, int], pieces: dict[Any, Any]) -> list[tuple[Any, Any]]:
    """Every split (a, b) of every piece with both halves in `ranks`, by the piece's rank."""
    merges = []
    for piece, rank in ranks.items():
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort(key=lambda m: m[:3])
    return [(pieces[m[3]], pieces[m[4]]) for m in merges]


def tiktoken_to_hf_tokenizer(
    mergeable_ranks: dict[bytes, int], *, pattern: str, special_tokens: dict[str, int], bos_token: str | None
) -> tokenizers.Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` that encodes as tiktoken does."""
    tk = _import_tokenizers()
    byte_map = bytes_to_unicode()

    def to_str(token: bytes) -> str:
        return "".join(byte_map[b] for b in token)

    pieces = {token: to_str(token) for token in mergeable_ranks}
    vocab = {pieces[token]: rank for token, rank in mergeable_ranks.items()}
    # ignore_merges: tiktoken looks a whole pre-token up in the vocabulary first.
    model = tk.models.BPE(vocab=vocab, merges=_merges(mergeable_ranks, pieces), ignore_merges=True)
    tokenizer = tk.Tokenizer(model)
    tokenizer.pre_tokenizer = tk.pre_tokenizers.Sequence(
        [
            tk.pre_tokenizers.Split(tk.Regex(pattern), behavior="isolated", invert=False),
            tk.pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tokenizer.decoder = tk.decoders.ByteLevel()
    for token, _ in sorted(special_tokens.items(), key=lambda item: item[1]):
        tokenizer.add_special_tokens([tk.AddedToken(token, special=True, normalized=False)])
    _check_special_ids(tokenizer, special_tokens)
    processors = [tk.processors.ByteLevel(trim_offsets=False)]
    if bos_token is not None:
        processors.append(_bos_processor(tk, bos_token, special_tokens[bos_token]))
    tokenizer.post_processor = tk.processors.Sequence(processors)
    return tokenizer


def sentencepiece_to_hf_tokenizer(sp: Any) -> tokenizers.Tokenizer:
    """A `tokenizers.Tokenizer` that encodes as the BPE SentencePiece processor `sp` does
    (Llama 2's layout: dummy prefix, no normalization, byte fallback)."""
    tk = _import_tokenizers()
    size = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(size)}
    # Only normal pieces take part in merges; control, unknown and byte pieces never do.
    normal = {
        sp.id_to_piece(i): i
        for i in range(size)
        if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))
    }
    # SentencePiece merges the highest score first; rank = position in descending score.
    by_score = sorted(normal, key=lambda piece: (-sp.get_score(normal[piece]), normal[piece]))
    ranks = {piece: rank for rank, piece in enumerate(by_score)}
    unk = sp.id_to_piece(sp.unk_id())
    model = tk.models.BPE(
        vocab=vocab,
        merges=_merges(ranks, {p: p for p in ranks}),
        unk_token=unk,
        fuse_unk=True,
        byte_fallback=True,
    )
    tokenizer = tk.Tokenizer(model)
    tokenizer.normalizer = tk.normalizers.Sequence(
        [tk.normalizers.Prepend("▁"), tk.normalizers.Replace(" ", "▁")]
    )
    tokenizer.decoder = tk.decoders.Sequence(
        [
            tk.decoders.Replace("▁", " "),
            tk.decoders.ByteFallback(),
            tk.decoders.Fuse(),
            tk.decoders.Strip(" ", 1, 0),
        ]
    )
    specials = {
        sp.id_to_piece(i): i for i in range(size) if sp.is_control(i) or sp.is_unknown(i)
    }
    for token, _ in sorted(specials.items(), key=lambda item: item[1]):
        tokenizer.add_special_tokens([tk.AddedToken(token, special=True, normalized=False)])
    _check_special_ids(tokenizer, specials)
    if sp.bos_id() >= 0:
        bos = sp.id_to_piece(sp.bos_id())
        tokenizer.post_processor = _bos_processor(tk, bos, sp.bos_id())
    return tokenizer


def _bos_processor(tk: Any, bos_token: str, bos_id: int) -> Any:
    # transformers adds BOS through the post-processor, as Meta's tokenizers do.
    return tk.processors.TemplateProcessing(
        single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[(bos_token, bos_id)]
    )


def _check_special_ids(tokenizer: Any, expected: dict[str, int]) -> None:
    for token, token_id in expected.items():
        if tokenizer.token_to_id(token) != token_id:
            raise AssertionError(f"{token} landed at id {tokenizer.token_to_id(token)}, expected {token_id}")
