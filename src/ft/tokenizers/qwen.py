"""Qwen's tokenizer (Qwen2.5, Qwen3): a byte-level BPE `tokenizer.json` with the
`<|endoftext|>` / `<|im_start|>` / `<|im_end|>` control tokens, and ChatML chats.

Reading the file is `ft.tokenizers.hf`'s job; what Qwen adds is:
- no BOS: a prompt starts with its text (`bos_token` is null in Qwen's configs);
- `<|im_end|>` ends a turn (`eot_id`, a stop id in generation), `<|endoftext|>` ends
  a document (`eos_id`, also the pad token);
- the chat format: ChatML (`chatml`), Qwen3's ChatML with thinking blocks
  (`qwen3`, when the vocabulary has `<think>`), or Qwen2.5's (`qwen2_5`: ChatML
  with Qwen2.5's default system prompt when a dialog has none, as its template
  renders it; chosen by the `qwen2_5` tokenizer family, or when the
  `tokenizer_config.json` next to the file has that template).

Qwen3 thinking: an assistant turn after the last user turn opens with
`<think>\\n{reasoning}\\n</think>\\n\\n` when it has reasoning (a `reasoning_content`
field, or `<think>...</think>` at the start of its content) and, on the final turn,
also when it has none, as Qwen3's own chat template renders it. An empty block is
boilerplate: it is rendered (the model sees it at inference too) but not trained
on, unless `train_empty_think` is set. Non-empty reasoning is trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

from ft.errors import AssetError
from ft.tokenizers.hf import HfTokenizer
from ft.tokenizers.qwen_chat import (  # noqa: F401  (re-exported)
    IM_END, IM_START, QWEN2_5_DEFAULT_SYSTEM, QWEN2_5_JINJA, QWEN3_JINJA, THINK, encode_chatml, split_reasoning,
)


class QwenTokenizer(HfTokenizer):
    family = "qwen"

    def __init__(self, path: str | Path, *, use_eot: bool = False, train_empty_think: bool = False,
                 chat_format: str | None = None) -> None:
        super().__init__(path, use_eot=use_eot)
        for token in (IM_START, IM_END):
            if self.token_to_id(token) is None:
                raise AssetError(f"{self.path} has no {token} token: it is not a Qwen tokenizer (tokenizer_family: qwen)")
        if chat_format is None:
            chat_format = ("qwen3" if self.token_to_id(THINK) is not None
                           else "qwen2_5" if _config_template_has_default_system(Path(self.path)) else "chatml")
        self.chat_format = chat_format  # type: ignore[assignment]
        self.train_empty_think = train_empty_think

    def encode_prompt(self, source: str) -> list[int]:
        """SFT prompt: the source as it is (Qwen has no BOS)."""
        return self.encode(source, add_bos=self.bos_id is not None)


def _config_template_has_default_system(file: Path) -> bool:
    """Whether the `tokenizer_config.json` beside `file` has Qwen2.5's chat template
    (a Qwen2.5 repository, or an ft export of one)."""
    config = file.parent / "tokenizer_config.json"
    try:
        template = json.loads(config.read_text()).get("chat_template")
    except (OSError, ValueError):
        return False
    return isinstance(template, str) and QWEN2_5_DEFAULT_SYSTEM in template


__all__ = ["QWEN2_5_DEFAULT_SYSTEM", "QWEN2_5_JINJA", "QWEN3_JINJA", "QwenTokenizer", "encode_chatml", "split_reasoning"]
