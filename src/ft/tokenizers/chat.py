"""Chat templates: a dialog -> token ids and a target mask, as Meta renders them.

Llama 3 (Meta's `ChatFormat`, the same string as the Hugging Face template):

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{content}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\\n\\n{content}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n{content}<|eot_id|>

Llama 2 (Meta's `chat_completion`): the system prompt is folded into the first
user turn; each user/assistant pair is `<s>[INST] {user} [/INST] {answer} </s>`,
and a final user turn is `<s>[INST] {user} [/INST]`.

ChatML (Qwen2.5; `chatml`), each message as it is, no BOS:

    <|im_start|>{role}\n{content}<|im_end|>\n

Qwen2.5 (`qwen2_5`) is ChatML led by Qwen2.5's default system prompt when the
dialog has no system message, as Qwen2.5-Instruct's template renders it.

Mistral v0.3 (`mistral`): `<s>[INST] {user}[/INST] {answer}</s>` with `[INST]` as
control tokens; see `ft.tokenizers.mistral`.

Qwen3 (`qwen3`) is ChatML whose assistant turns after the last user turn open with
a thinking block, `<think>\n{reasoning}\n</think>\n\n` (empty on the final turn
when there is no reasoning), as Qwen3's own template renders them; see `ft.tokenizers.qwen`.

Llama contents are stripped, as Meta does. The mask is True on the assistant's content
and on the token that ends its turn (`<|eot_id|>` / `</s>`), so the model learns
to stop; headers, system and user tokens are False.
"""

from __future__ import annotations

from typing import Sequence

from ft.errors import DataError
from ft.tokenizers.chat_common import ChatTokenizer, Message, common_prefix_length
from ft.tokenizers.mistral_chat import B_INST, E_INST, MISTRAL_JINJA, encode_mistral  # Llama 2 shares [INST]
from ft.tokenizers.qwen_chat import QWEN2_5_JINJA, QWEN3_JINJA, encode_chatml


ROLES = ("system", "user", "assistant")

B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

LLAMA3_JINJA = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

LLAMA2_JINJA = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set loop_messages = messages[1:] %}{%- set system_message = messages[0]['content'] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- set system_message = false %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if loop.index0 == 0 and system_message != false %}"
    "{%- set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{%- else %}{%- set content = message['content'] %}{%- endif %}"
    "{%- if message['role'] == 'user' %}{{- bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + content.strip() + ' ' + eos_token }}{%- endif %}"
    "{%- endfor %}"
)


CHATML_JINJA = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def jinja_chat_template(chat_format: str) -> str:
    """The transformers `chat_template` that renders the same string as `encode_chat`."""
    return {"llama3": LLAMA3_JINJA, "llama2": LLAMA2_JINJA, "chatml": CHATML_JINJA, "qwen3": QWEN3_JINJA,
            "qwen2_5": QWEN2_5_JINJA, "mistral": MISTRAL_JINJA}[chat_format]


def encode_chat(
    tokenizer: ChatTokenizer, messages: Sequence[Message], *, add_generation_prompt: bool = False
) -> tuple[list[int], list[bool]]:
    """`messages` rendered with `tokenizer.chat_format`: (ids, target mask)."""
    _check_messages(messages)
    if tokenizer.chat_format == "llama3":
        return _encode_llama3(tokenizer, messages, add_generation_prompt)
    if tokenizer.chat_format in ("chatml", "qwen3", "qwen2_5"):
        return encode_chatml(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    if tokenizer.chat_format == "mistral":
        return encode_mistral(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    return _encode_llama2(tokenizer, messages, add_generation_prompt)


def _check_messages(messages: Sequence[Message]) -> None:
    if not messages:
        raise DataError("a chat example has no messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(
                f"chat message {index} must be a mapping with 'role' and 'content', got {message!r}"
            )
        if message["role"] not in ROLES:
            raise DataError(
                f"chat message {index} has role {message['role']!r}; expected one of {', '.join(ROLES)}"
            )
        if not isinstance(message["content"], str):
            raise DataError(
                f"chat message {index} ({message['role']}) has content of type "
                f"{type(message['content']).__name__}; expected a string"
            )


def _special_id(tokenizer: ChatTokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise DataError(
            f"the tokenizer at {tokenizer.path} has no {token} token, so it cannot render a Llama 3 chat"
        )
    return token_id


def _encode_llama3(
    tokenizer: ChatTokenizer, messages: Sequence[Message], add_generation_prompt: bool
) -> tuple[list[int], list[bool]]:
    start_header = _special_id(tokenizer, "<|start_header_id|>")
    end_header = _special_id(tokenizer, "<|end_header_id|>")
    eot = _special_id(tokenizer, "<|eot_id|>")

    ids: list[int] = []
    mask: list[bool] = []

    def add(new_ids: list[int], target: bool) -> None:
        ids.extend(new_ids)
        mask.extend([target] * len(new_ids))

    def header(role: str) -> list[int]:
        return [start_header, *tokenizer.encode(role), end_header, *tokenizer.encode("\n\n")]

    if tokenizer.bos_id is not None:
        add([tokenizer.bos_id], False)
    for message in messages:
        add(header(message["role"]), False)
        is_target = message["role"] == "assistant"
        add(tokenizer.encode(message["content"].strip()) + [eot], is_target)
    if add_generation_prompt:
        add(header("assistant"), False)
    return ids, mask


def _encode_llama2(
    tokenizer: ChatTokenizer, messages: Sequence[Message], add_generation_prompt: bool
) -> tuple[list[int], list[bool]]:
    dialog = list(messages)
    if dialog[0]["role"] == "system":
        if len(dialog) < 2 or dialog[1]["role"] != "user":
            raise DataError("a Llama 2 chat needs a user message after the system message")
        dialog = [
            {"role": "user", "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]},
            *dialog[2:],
        ]
    for index, message in enumerate(dialog):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise DataError(
                "a Llama 2 chat must alternate user/assistant after an optional system message; "
                f"turn {index} is {message['role']!r}, expected {expected!r}"
            )
    if add_generation_prompt and dialog[-1]["role"] != "user":
        raise DataError("add_generation_prompt needs a Llama 2 chat that ends with a user message")

    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    ids: list[int] = []
    mask: list[bool] = []
    for index in range(0, len(dialog), 2):
        prompt = f"{B_INST} {dialog[index]['content'].strip()} {E_INST}"
        if index + 1 == len(dialog):
            turn_ids = bos + tokenizer.encode(prompt)
            ids += turn_ids
            mask += [False] * len(turn_ids)
            break
        # Meta encodes prompt and answer as one string. The prompt's own encoding is a
        # prefix of it (SentencePiece never merges across the space before the answer);
        # should a tokenizer merge across it, the shared token goes to the target.
        turn_ids = tokenizer.encode(f"{prompt} {dialog[index + 1]['content'].strip()} ")
        prompt_length = common_prefix_length(tokenizer.encode(prompt), turn_ids)
        ids += bos + turn_ids + [tokenizer.eos_id]
        mask += [False] * (len(bos) + prompt_length) + [True] * (len(turn_ids) - prompt_length + 1)
    return ids, mask
