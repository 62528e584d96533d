"""Chat messages -> prompt text with the model's jinja template in a sandbox, or a named built-in, as llama.cpp renders them."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from runtime.errors import GGUFError, InvalidRequestError

# llama.cpp's built-in templates by their --chat-template names (src/llama-chat.cpp),
# written as jinja so that every template takes the same path.
BUILTIN: dict[str, str] = {
    "chatml": (
        "{%- for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endfor %}"
        "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{%- for m in messages %}"
        "{{ '<|start_header_id|>' + m.role + '<|end_header_id|>\n\n' + m.content | trim + '<|eot_id|>' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # Gemma has no system role: system text goes at the top of the next user turn.
    "gemma": (
        "{%- set ns = namespace(system='') %}"
        "{%- for m in messages %}"
        "{%- if m.role == 'system' %}{% set ns.system = ns.system + m.content | trim %}"
        "{%- else %}{% set role = 'model' if m.role == 'assistant' else m.role %}"
        "{{ '<start_of_turn>' + role + '\n' }}"
        "{%- if ns.system and role != 'model' %}{{ ns.system + '\n\n' }}{% set ns.system = '' %}{% endif %}"
        "{{ m.content | trim + '<end_of_turn>\n' }}"
        "{%- endif %}{% endfor %}"
        "{%- if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
    "phi3": (
        "{%- for m in messages %}{{ '<|' + m.role + '|>\n' + m.content + '<|end|>\n' }}{% endfor %}"
        "{%- if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
    "zephyr": (
        "{%- for m in messages %}{{ '<|' + m.role + '|>\n' + m.content + '<|endoftext|>\n' }}{% endfor %}"
        "{%- if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
    "mistral-v7": (
        "{%- for m in messages %}"
        "{%- if m.role == 'system' %}{{ '[SYSTEM_PROMPT] ' + m.content + '[/SYSTEM_PROMPT]' }}"
        "{%- elif m.role == 'user' %}{{ '[INST] ' + m.content + '[/INST]' }}"
        "{%- else %}{{ ' ' + m.content + '</s>' }}{% endif %}{% endfor %}"
    ),
    # Llama 2 without and with <<SYS>> blocks; one "[INST] " opens each user turn.
    "llama2": (
        "{{ '[INST] ' }}{%- set ns = namespace(inside=true) %}"
        "{%- for m in messages %}"
        "{%- if not ns.inside %}{{ '[INST] ' }}{% set ns.inside = true %}{% endif %}"
        "{%- if m.role == 'system' %}{{ m.content + '\n' }}"
        "{%- elif m.role == 'user' %}{{ m.content + ' [/INST]' }}"
        "{%- else %}{{ m.content + '</s>' }}{% set ns.inside = false %}{% endif %}{% endfor %}"
    ),
    "llama2-sys": (
        "{{ '[INST] ' }}{%- set ns = namespace(inside=true) %}"
        "{%- for m in messages %}"
        "{%- if not ns.inside %}{{ '[INST] ' }}{% set ns.inside = true %}{% endif %}"
        "{%- if m.role == 'system' %}{{ '<<SYS>>\n' + m.content + '\n<</SYS>>\n\n' }}"
        "{%- elif m.role == 'user' %}{{ m.content + ' [/INST]' }}"
        "{%- else %}{{ m.content + '</s>' }}{% set ns.inside = false %}{% endif %}{% endfor %}"
    ),
}
BUILTIN_NAMES = tuple(BUILTIN)
DEFAULT = "chatml"  # what llama.cpp uses when the file has no template


def _raise(message: str) -> None:
    raise InvalidRequestError(f"chat template: {message}")


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    # As transformers renders chat templates: blocks trimmed, loop controls, tojson unescaped.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    """A compiled chat template and the BOS/EOS texts it may use."""

    def __init__(
        self, source: str, bos_token: str = "", eos_token: str = "", name: str = "custom",
        strip_bos: bool = False, strip_eos: bool = False,
    ) -> None:  # fmt: skip
        self.source, self.name = source, name
        self.bos_token, self.eos_token = bos_token, eos_token
        # The tokenizer adds BOS (EOS) itself when the vocabulary says so: llama.cpp then
        # removes the copy a template writes, so the prompt does not start with two.
        self.strip_bos, self.strip_eos = strip_bos, strip_eos
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as e:
            raise GGUFError(f"chat template {name!r} does not compile: {_one_line(e)}") from e

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], override: str | None = None) -> ChatTemplate:
        """--chat-template (a built-in name or jinja text), else the file's template, else chatml."""
        tokens = metadata.get("tokenizer.ggml.tokens") or []

        def text(key: str) -> str:
            i = metadata.get(f"tokenizer.ggml.{key}_token_id")
            return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else ""

        is_spm = metadata.get("tokenizer.ggml.model") == "llama"
        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", is_spm))
        add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
        file_source = metadata.get("tokenizer.chat_template")
        if override:
            source, name = (BUILTIN[override], override) if override in BUILTIN else (override, "custom")
        elif isinstance(file_source, str) and file_source:
            source, name = file_source, "gguf"
        else:
            source, name = BUILTIN[DEFAULT], DEFAULT
        return cls(source, text("bos"), text("eos"), name, strip_bos=add_bos, strip_eos=add_eos)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> str:
        ctx = dict(kwargs)
        ctx.update(
            messages=normalize_messages(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )
        if tools:
            ctx["tools"] = list(tools)
        try:
            out = self._template.render(**ctx)
        except InvalidRequestError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as e:
            raise InvalidRequestError(f"chat template failed: {_one_line(e)}") from e
        if self.strip_bos and self.bos_token and out.startswith(self.bos_token):
            out = out[len(self.bos_token) :]
        if self.strip_eos and self.eos_token and out.endswith(self.eos_token):
            out = out[: -len(self.eos_token)]
        return out


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validate messages; OpenAI content parts become one string (text parts joined by newlines)."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise InvalidRequestError("messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidRequestError(f"messages[{i}] must be an object")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise InvalidRequestError(f"messages[{i}].role must be a non-empty string")
        if content is None:
            content = ""
        elif isinstance(content, list):
            texts = []
            for part in content:
                kind = part.get("type") if isinstance(part, Mapping) else None
                if kind != "text" or not isinstance(part.get("text"), str):
                    what = kind if isinstance(kind, str) else type(part).__name__
                    raise InvalidRequestError(
                        f"messages[{i}].content: {what!r} parts are not supported (multimodal input needs a vision model)"
                    )
                texts.append(part["text"])
            content = "\n".join(texts)
        elif not isinstance(content, str):
            raise InvalidRequestError(f"messages[{i}].content must be a string, a list of parts or null")
        out.append({**m, "role": role, "content": content})
    return out


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__
