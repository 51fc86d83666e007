"""A tiny Mistral-v0.3-style tokenizer trained in the test: SentencePiece-style BPE
(Metaspace, byte fallback) in a `tokenizer.json` with `<unk>`, `<s>`, `</s>`, `[INST]`,
`[/INST]` as its first ids, and a `tokenizer_config.json` carrying Mistral 7B Instruct
v0.3's chat template (the user/assistant/system part; the tool branches are left out).
Shared by the tokenizer and recipe tests."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]

# Mistral-7B-Instruct-v0.3's template without its tool branches.
V0_3_TEMPLATE = (
    '{%- if messages[0]["role"] == "system" %}\n'
    '    {%- set system_message = messages[0]["content"] %}\n'
    '    {%- set loop_messages = messages[1:] %}\n'
    '{%- else %}\n'
    '    {%- set loop_messages = messages %}\n'
    '{%- endif %}\n'
    '{%- for message in loop_messages %}\n'
    '    {%- if (message["role"] == "user") != (loop.index0 % 2 == 0) %}\n'
    '        {{- raise_exception("After the optional system message, conversation roles must alternate '
    'user/assistant/user/assistant/...") }}\n'
    '    {%- endif %}\n'
    '{%- endfor %}\n'
    '{{- bos_token }}\n'
    '{%- for message in loop_messages %}\n'
    '    {%- if message["role"] == "user" %}\n'
    '        {%- if loop.last and system_message is defined %}\n'
    '            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}\n'
    '        {%- else %}\n'
    '            {{- "[INST] " + message["content"] + "[/INST]" }}\n'
    '        {%- endif %}\n'
    '    {%- elif message["role"] == "assistant" %}\n'
    '        {{- " " + message["content"]|trim + eos_token}}\n'
    '    {%- else %}\n'
    '        {{- raise_exception("Only user and assistant roles are supported, with the exception of an '
    'initial optional system message!") }}\n'
    '    {%- endif %}\n'
    '{%- endfor %}\n'
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.\n",
    "Hello world! How are you today? I'm fine, thanks.\n\n",
    "What is 2 + 3? The answer is 5. Name three colours: red, green, blue.\n",
    "You are a helpful assistant. Answer briefly.\n",
    "Ünïcödé text: café, naïve.\n",
] * 20


def train_mistral_tokenizer(directory: Path, *, vocab_size: int = 400) -> Path:
    """Write tokenizer.json + tokenizer_config.json into `directory`; returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + 256, special_tokens=[*SPECIAL, *byte_tokens],
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "LlamaTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": V0_3_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory
