"""Jinja sources for the chat templates llama.cpp knows by name (`--chat-template NAME`)."""

from __future__ import annotations

# Each source reproduces, for string contents, what llama.cpp's hand-written formatter for that
# name (llm_chat_apply_template in src/llama-chat.cpp) produces; the expected strings in
# tests/test_chat_template.py come from llama.cpp's own tests/test-chat-template.cpp.
# Literals are emitted through {{ }} so trim_blocks/lstrip_blocks never eat template text, and
# r-strings keep '\n' a Jinja escape.

# llama.cpp's trim() strips C isspace() characters only; Jinja's |trim would also strip Unicode
# spaces such as U+00A0, which would change prompts the C++ formatter leaves alone.
_TRIM = r".strip(' \t\n\v\f\r')"

CHATML = (
    r"{%- for message in messages -%}"
    r"{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


def _llama2(system_tags: bool, bos_inside: bool, strip: bool) -> str:
    # llama.cpp opens the first turn itself, without a BOS (the tokenizer adds that), and never
    # emits a generation prompt: the open "[INST] ... [/INST]" turn already is one.
    content = "message['content']" + (_TRIM if strip else "")
    system = (
        r"{{ '<<SYS>>\n' + content + '\n<</SYS>>\n\n' }}"
        if system_tags
        else r"{{ content + '\n' }}"
    )
    reopen = "'<s>[INST] '" if bos_inside else "'[INST] '"
    return (
        r"{%- set ns = namespace(inside=true) -%}{{ '[INST] ' }}"
        r"{%- for message in messages -%}"
        f"{{%- set content = {content} -%}}"
        f"{{%- if not ns.inside -%}}{{%- set ns.inside = true -%}}{{{{ {reopen} }}}}{{%- endif -%}}"
        f"{{%- if message['role'] == 'system' -%}}{system}"
        r"{%- elif message['role'] == 'user' -%}{{ content + ' [/INST]' }}"
        r"{%- else -%}{{ content + '</s>' }}{%- set ns.inside = false -%}"
        r"{%- endif -%}{%- endfor -%}"
    )


def _mistral(leading: str, trailing: str, trim_assistant: bool) -> str:
    # v1/v3/v3-tekken differ only in the spaces around [INST] and whether replies are trimmed;
    # a system message opens the turn its user message then closes.
    reply = "message['content']" + (_TRIM if trim_assistant else "")
    return (
        r"{%- set ns = namespace(inside=false) -%}"
        r"{%- for message in messages -%}"
        f"{{%- if not ns.inside -%}}{{{{ '{leading}[INST]{trailing}' }}}}"
        r"{%- set ns.inside = true -%}{%- endif -%}"
        r"{%- if message['role'] == 'system' -%}{{ message['content'] + '\n\n' }}"
        f"{{%- elif message['role'] == 'user' -%}}{{{{ message['content'] + '{leading}[/INST]' }}}}"
        f"{{%- else -%}}{{{{ '{trailing}' + {reply} + '</s>' }}}}"
        r"{%- set ns.inside = false -%}{%- endif -%}{%- endfor -%}"
    )


def _mistral_v7(space: str) -> str:
    return (
        r"{%- for message in messages -%}"
        r"{%- if message['role'] == 'system' -%}"
        f"{{{{ '[SYSTEM_PROMPT]{space}' + message['content'] + '[/SYSTEM_PROMPT]' }}}}"
        r"{%- elif message['role'] == 'user' -%}"
        f"{{{{ '[INST]{space}' + message['content'] + '[/INST]' }}}}"
        f"{{%- else -%}}{{{{ '{space}' + message['content'] + '</s>' }}}}"
        r"{%- endif -%}{%- endfor -%}"
    )


def _role_tags(end: str) -> str:
    # phi3 and zephyr: "<|role|>\n" + content + end-of-turn marker + "\n".
    return (
        r"{%- for message in messages -%}"
        f"{{{{ '<|' + message['role'] + '|>\\n' + message['content'] + '{end}\\n' }}}}"
        r"{%- endfor -%}"
        r"{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
    )


PHI4 = (
    r"{%- for message in messages -%}"
    r"{{ '<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] + '<|im_end|>' }}"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{ '<|im_start|>assistant<|im_sep|>' }}{%- endif -%}"
)

# Gemma has no system role: llama.cpp concatenates system contents and prefixes them to the next
# non-model turn; assistant is called "model" and every content is trimmed.
GEMMA = (
    r"{%- set ns = namespace(system='') -%}"
    r"{%- for message in messages -%}"
    r"{%- if message['role'] == 'system' -%}"
    f"{{%- set ns.system = ns.system + message['content']{_TRIM} -%}}"
    r"{%- else -%}"
    r"{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    r"{{ '<start_of_turn>' + role + '\n' }}"
    r"{%- if ns.system and role != 'model' -%}"
    r"{{ ns.system + '\n\n' }}{%- set ns.system = '' -%}"
    r"{%- endif -%}"
    f"{{{{ message['content']{_TRIM} + '<end_of_turn>\\n' }}}}"
    r"{%- endif -%}{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

LLAMA3 = (
    r"{%- for message in messages -%}"
    r"{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    f"{{{{ message['content']{_TRIM} + '<|eot_id|>' }}}}"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    r"{%- endif -%}"
)

# Roles other than system/user/assistant are dropped, as llama.cpp does.
DEEPSEEK3 = (
    r"{%- for message in messages -%}"
    r"{%- if message['role'] == 'system' -%}{{ message['content'] + '\n\n' }}"
    r"{%- elif message['role'] == 'user' -%}{{ '<｜User｜>' + message['content'] }}"
    r"{%- elif message['role'] == 'assistant' -%}"
    r"{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}"
    r"{%- endif -%}{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{ '<｜Assistant｜>' }}{%- endif -%}"
)

BUILTIN_SOURCES: dict[str, str] = {
    "chatml": CHATML,
    "llama2": _llama2(system_tags=False, bos_inside=False, strip=False),
    "llama2-sys": _llama2(system_tags=True, bos_inside=False, strip=False),
    "llama2-sys-bos": _llama2(system_tags=True, bos_inside=True, strip=False),
    "llama2-sys-strip": _llama2(system_tags=True, bos_inside=False, strip=True),
    "mistral-v1": _mistral(leading=" ", trailing=" ", trim_assistant=False),
    "mistral-v3": _mistral(leading="", trailing=" ", trim_assistant=True),
    "mistral-v3-tekken": _mistral(leading="", trailing="", trim_assistant=False),
    "mistral-v7": _mistral_v7(" "),
    "mistral-v7-tekken": _mistral_v7(""),
    "phi3": _role_tags("<|end|>"),
    "phi4": PHI4,
    "zephyr": _role_tags("<|endoftext|>"),
    "gemma": GEMMA,
    "llama3": LLAMA3,
    "deepseek3": DEEPSEEK3,
}
