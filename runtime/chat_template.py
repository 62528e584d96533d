"""Chat messages rendered to a prompt string the way llama.cpp's server applies a model's chat template."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any, NoReturn

from jinja2 import Template, TemplateError, TemplateSyntaxError, nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from runtime.chat_templates_builtin import BUILTIN_SOURCES
from runtime.errors import GGUFError, InvalidRequestError

__all__ = ["BUILTIN_NAMES", "ChatTemplate"]

BUILTIN_NAMES: tuple[str, ...] = tuple(BUILTIN_SOURCES)

# Same defaults as runtime/tokenizer.py (llama.cpp's llama_vocab::load): SPM vocabularies and the
# Llama 3 BPE pre-tokenizers add BOS unless the file says otherwise.
_BOS_ADDING_PRE = ("llama3", "llama-v3", "llama-bpe")


def _raise_exception(message: str) -> NoReturn:
    raise InvalidRequestError(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # HF transformers replaces Jinja's tojson, which HTML-escapes '<', '>', '&' and "'" and so
    # would corrupt tool schemas; chat templates are written against HF's version.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class _GenerationTag(Extension):
    """Accept HF's `{% generation %}...{% endgeneration %}` (assistant-mask markers) as a no-op."""

    tags = {"generation"}

    def parse(self, parser: Parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _make_env() -> ImmutableSandboxedEnvironment:
    # The configuration HF transformers uses (and llama.cpp's minja mirrors); the immutable sandbox
    # refuses private attributes and in-place mutation of values passed in, such as messages.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _make_env()


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _flatten_content(content: Any, where: str) -> str:
    """A message's content as the single string llama.cpp hands the template."""
    if content is None:
        # llama.cpp renders a missing/null content as "" (templates may concatenate it).
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError(
            f"{where}.content must be a string, null or a list of content parts, "
            f"not {type(content).__name__}"
        )
    text = ""
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, Mapping):
            raise InvalidRequestError(f"{at} must be an object, not {type(part).__name__}")
        kind = part.get("type")
        if not isinstance(kind, str):
            raise InvalidRequestError(f"{at} has no string 'type'")
        if kind != "text":
            raise InvalidRequestError(
                f"{at} has type {kind!r}: multimodal input is not supported (only 'text' parts)"
            )
        piece = part.get("text")
        if not isinstance(piece, str):
            raise InvalidRequestError(f"{at} is a text part without a string 'text'")
        # llama.cpp (common_chat_msg::to_json_oaicompat) joins text parts with "\n", adding the
        # separator only once something has been written, so leading empty parts vanish.
        if text:
            text += "\n"
        text += piece
    return text


def _normalize_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise InvalidRequestError(f"{where} must be an object, not {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidRequestError(f"{where}.role must be a non-empty string")
        if "content" not in message and "tool_calls" not in message:
            raise InvalidRequestError(f"{where} must have 'content' or 'tool_calls'")
        # Other fields (tool_calls, tool_call_id, name, reasoning_content) reach the template
        # unchanged, as in llama.cpp, for templates that render tool use.
        normalized = dict(message)
        normalized["content"] = _flatten_content(message.get("content"), where)
        out.append(normalized)
    return out


class ChatTemplate:
    """A compiled chat template plus the BOS/EOS texts it is rendered with; immutable once built."""

    __slots__ = ("_source", "_name", "_bos", "_eos", "_strip_bos", "_strip_eos", "_template")
    _source: str
    _name: str
    _bos: str
    _eos: str
    _strip_bos: bool
    _strip_eos: bool
    _template: Template

    def __init__(
        self,
        source: str,
        bos_token: str = "",
        eos_token: str = "",
        name: str = "custom",
        *,
        strip_bos: bool = False,
        strip_eos: bool = False,
    ) -> None:
        """Compile source (GGUFError if it does not compile).

        strip_bos/strip_eos: the tokenizer adds BOS/EOS itself, so renders lose a leading
        bos_token / trailing eos_token text, as llama.cpp does.
        """
        if not isinstance(source, str):
            raise GGUFError(f"chat template {name!r} is not a string")
        try:
            template = _ENV.from_string(source)
        except TemplateSyntaxError as e:
            raise GGUFError(
                f"chat template {name!r} does not compile: {_one_line(e.message or '')} "
                f"(line {e.lineno})"
            ) from None
        except TemplateError as e:
            raise GGUFError(
                f"chat template {name!r} does not compile: {_one_line(str(e))}"
            ) from None
        setter = object.__setattr__
        setter(self, "_source", source)
        setter(self, "_name", name)
        setter(self, "_bos", bos_token)
        setter(self, "_eos", eos_token)
        setter(self, "_strip_bos", strip_bos)
        setter(self, "_strip_eos", strip_eos)
        setter(self, "_template", template)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"ChatTemplate is immutable (cannot set {key!r})")

    def __repr__(self) -> str:
        return (
            f"ChatTemplate(name={self._name!r}, bos_token={self._bos!r}, eos_token={self._eos!r})"
        )

    @property
    def source(self) -> str:
        return self._source

    @property
    def name(self) -> str:
        return self._name

    @property
    def bos_token(self) -> str:
        return self._bos

    @property
    def eos_token(self) -> str:
        return self._eos

    @property
    def strip_bos(self) -> bool:
        """Whether a leading BOS text is cut from renders (the tokenizer adds BOS itself)."""
        return self._strip_bos

    @property
    def strip_eos(self) -> bool:
        return self._strip_eos

    @classmethod
    def from_metadata(
        cls, metadata: Mapping[str, Any], override: str | None = None
    ) -> ChatTemplate:
        """The template llama-server would use for a GGUF file's metadata.

        override is a built-in name (see BUILTIN_NAMES) or a whole Jinja template, as llama.cpp's
        `--chat-template` / `--chat-template-file`. Without one the file's tokenizer.chat_template
        is used; a file without one gets a built-in chosen by architecture, else chatml.
        """
        tokens = metadata.get("tokenizer.ggml.tokens")
        tokens = tokens if isinstance(tokens, list) else []
        spm = metadata.get("tokenizer.ggml.model") == "llama"

        def token_text(key: str, spm_default: int) -> str:
            # llama.cpp passes the texts of the vocabulary's BOS/EOS, "" where it has none.
            tid = metadata.get(f"tokenizer.ggml.{key}_token_id", spm_default if spm else None)
            if isinstance(tid, int) and not isinstance(tid, bool) and 0 <= tid < len(tokens):
                text = tokens[tid]
                return text if isinstance(text, str) else ""
            return ""

        add_bos = metadata.get(
            "tokenizer.ggml.add_bos_token",
            spm or metadata.get("tokenizer.ggml.pre") in _BOS_ADDING_PRE,
        )
        common: dict[str, Any] = {
            "bos_token": token_text("bos", 1),
            "eos_token": token_text("eos", 2),
            "strip_bos": bool(add_bos),
            "strip_eos": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        }

        if override:  # "" means none, as an empty --chat-template does in llama.cpp
            if override in BUILTIN_SOURCES:
                return cls(BUILTIN_SOURCES[override], name=override, **common)
            if "{{" not in override and "{%" not in override:
                raise InvalidRequestError(
                    f"unknown chat template {override!r}; built-in templates: "
                    + ", ".join(BUILTIN_NAMES)
                )
            try:
                return cls(override, name="override", **common)
            except GGUFError as e:
                # The user's own template, not the file, is at fault.
                raise InvalidRequestError(str(e)) from None

        source = metadata.get("tokenizer.chat_template")
        if source is not None and not isinstance(source, str):
            raise GGUFError("tokenizer.chat_template is not a string")
        if source:  # llama.cpp treats an empty template as none
            return cls(source, name="gguf", **common)
        name = _fallback_builtin(metadata.get("general.architecture"), tokens)
        return cls(BUILTIN_SOURCES[name], name=name, **common)

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[Any] | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text for messages; extra kwargs (e.g. enable_thinking) become template variables."""
        normalized = _normalize_messages(messages)
        if tools is not None and not isinstance(tools, list):
            raise InvalidRequestError(f"tools must be a list, not {type(tools).__name__}")
        context: dict[str, Any] = dict(kwargs)
        # tools=None (not []) when absent, as HF passes it: Llama 3.1-style templates test
        # `tools is not none` and would otherwise announce an empty tool list.
        context.update(
            messages=normalized,
            add_generation_prompt=bool(add_generation_prompt),
            tools=tools,
            bos_token=self._bos,
            eos_token=self._eos,
        )
        try:
            result = self._template.render(context)
        except InvalidRequestError:
            raise  # raise_exception() from the template: its message is the whole story
        except Exception as e:
            # Jinja errors (undefined, sandbox refusals) and plain Python ones from a template bug
            # (e.g. 'a' + 1) alike: the request cannot be rendered, and says why in one line.
            raise InvalidRequestError(
                f"chat template {self._name!r} failed: {type(e).__name__}: {_one_line(str(e))}"
            ) from None
        # Like llama.cpp (common/chat.cpp): the tokenizer adds BOS/EOS itself, so a template that
        # writes them at the very start/end (Llama 3's writes bos_token first) would double them;
        # the texts are cut here instead of rendering with bos_token="" because templates may also
        # use them between messages.
        if self._strip_bos and self._bos and result.startswith(self._bos):
            result = result[len(self._bos) :]
        if self._strip_eos and self._eos and result.endswith(self._eos):
            result = result[: -len(self._eos)]
        return result


def _fallback_builtin(architecture: Any, tokens: list[Any]) -> str:
    """The built-in for a file without tokenizer.chat_template: chatml, as llama.cpp does.

    Even for the default model (Gemma 3 270M, which ships without a template): a
    client switching from llama.cpp must get the same prompt; `--chat-template gemma`
    gives Gemma's own format.
    """
    return "chatml"
