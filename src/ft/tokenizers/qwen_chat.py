"""Qwen's chat formats, apart from its tokenizer (so `ft.tokenizers.chat` reads them
without importing a tokenizer class): ChatML (`chatml`), Qwen3's ChatML with thinking
blocks (`qwen3`) and Qwen2.5's (`qwen2_5`, with its default system prompt); see
`ft.tokenizers.qwen` for how each is chosen and how thinking blocks are trained.
"""

from __future__ import annotations

from typing import Sequence

from ft.errors import AssetError
from ft.tokenizers.chat_common import ChatTokenizer, Message, common_prefix_length


IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
THINK, END_THINK = "<think>", "</think>"

QWEN2_5_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Qwen2.5-Instruct's chat template without tools: the same string as `encode_chatml` for `qwen2_5`.
QWEN2_5_JINJA = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\n" + QWEN2_5_DEFAULT_SYSTEM + "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen3's chat template without tools: the same string as `encode_chatml` for the `qwen3` format.
QWEN3_JINJA = (
    "{%- set ns = namespace(last_query_index=messages|length - 1, found=false) %}"
    "{%- for message in messages[::-1] %}"
    "{%- if not ns.found and message['role'] == 'user' %}"
    "{%- set ns.found = true %}{%- set ns.last_query_index = messages|length - 1 - loop.index0 %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- set content = message['content'] %}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- set reasoning_content = '' %}"
    "{%- if message['reasoning_content'] is string %}{%- set reasoning_content = message['reasoning_content'] %}"
    "{%- elif '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n'"
    " + content.lstrip('\\n') + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def split_reasoning(message: Message) -> tuple[str, str]:
    """(reasoning, content) of an assistant message, as Qwen3's template splits them."""
    content = message["content"]
    if isinstance(message.get("reasoning_content"), str):
        return message["reasoning_content"], content
    if END_THINK in content:
        reasoning = content.split(END_THINK)[0].rstrip("\n").split(THINK)[-1].lstrip("\n")
        return reasoning, content.split(END_THINK)[-1].lstrip("\n")
    return "", content


def encode_chatml(
    tokenizer: ChatTokenizer, messages: Sequence[Message], *, add_generation_prompt: bool = False
) -> tuple[list[int], list[bool]]:
    """A ChatML (or Qwen3) dialog: (ids, mask True on assistant content and its <|im_end|>).

    Each turn is encoded as one string between the control tokens, so the ids are
    those of the whole rendered text; where the header and the content share a token
    (content starting with a newline), the shared token goes to the target.
    """
    im_start, im_end = tokenizer.token_to_id(IM_START), tokenizer.token_to_id(IM_END)
    if im_start is None or im_end is None:
        raise AssetError(f"the tokenizer at {tokenizer.path} has no {IM_START} / {IM_END}, so it cannot render ChatML")
    qwen3 = tokenizer.chat_format == "qwen3"
    if tokenizer.chat_format == "qwen2_5" and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": QWEN2_5_DEFAULT_SYSTEM}, *messages]
    train_empty_think = getattr(tokenizer, "train_empty_think", False)
    user_turns = [i for i, m in enumerate(messages) if m["role"] == "user"]
    last_query = user_turns[-1] if user_turns else len(messages) - 1
    newline = tokenizer.encode("\n")
    ids: list[int] = []
    mask: list[bool] = []
    for index, message in enumerate(messages):
        header = message["role"] + "\n"
        think, content, trained_from = "", message["content"], None
        if message["role"] == "assistant" and qwen3:
            reasoning, content = split_reasoning(message)
            if index > last_query and (index == len(messages) - 1 or reasoning):
                think = f"{THINK}\n{reasoning.strip(chr(10))}\n{END_THINK}\n\n"
                content = content.lstrip("\n")
                if not reasoning.strip() and not train_empty_think:
                    trained_from = header + think
        turn = tokenizer.encode(header + think + content)
        if message["role"] == "assistant":
            start = common_prefix_length(tokenizer.encode(trained_from or header), turn)
            ids += [im_start, *turn, im_end, *newline]
            mask += [False] * (1 + start) + [True] * (len(turn) - start + 1) + [False] * len(newline)
        else:
            ids += [im_start, *turn, im_end, *newline]
            mask += [False] * (len(turn) + 2 + len(newline))
    if add_generation_prompt:
        prompt = [im_start, *tokenizer.encode("assistant\n")]
        ids += prompt
        mask += [False] * len(prompt)
    return ids, mask


__all__ = ["QWEN2_5_DEFAULT_SYSTEM", "QWEN2_5_JINJA", "QWEN3_JINJA", "encode_chatml", "split_reasoning"]
