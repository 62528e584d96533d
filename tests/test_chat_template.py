"""Chat templates: llama.cpp's /apply-template outputs, the built-ins, the fallback, the sandbox, bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from runtime.chat_template import BUILTIN_NAMES, ChatTemplate
from runtime.errors import GGUFError, InvalidRequestError
from runtime.gguf.reader import GGUFFile

DATA = Path(__file__).parent / "data"
USER_X = [{"role": "user", "content": "x"}]


def _msgs(*pairs: tuple[str, str]) -> list[dict[str, Any]]:
    return [{"role": r, "content": c} for r, c in pairs]


@pytest.fixture(scope="module")
def llama3_md(llama3_tiny_path: Path) -> dict[str, Any]:
    return GGUFFile(llama3_tiny_path).metadata


@pytest.fixture(scope="module")
def apply_template_cases() -> list[dict[str, Any]]:
    with open(DATA / "llama3_tiny_apply_template.jsonl") as f:
        cases = [json.loads(line) for line in f if line.strip()]
    assert cases
    return cases


def test_file_template_matches_llama_cpp_apply_template(llama3_md, apply_template_cases):
    tmpl = ChatTemplate.from_metadata(llama3_md)
    assert (tmpl.name, tmpl.bos_token, tmpl.eos_token) == (
        "gguf",
        "<|begin_of_text|>",
        "<|end_of_text|>",
    )
    assert tmpl.strip_bos  # the vocabulary adds BOS, so the template's own copy is cut
    for case in apply_template_cases:
        assert tmpl.render(case["messages"], case["add_generation_prompt"]) == case["prompt"]


def test_bos_is_written_by_the_template_and_cut_only_when_the_tokenizer_adds_it(llama3_md):
    keep = ChatTemplate(
        llama3_md["tokenizer.chat_template"], "<|begin_of_text|>", "<|end_of_text|>"
    )
    assert keep.render(USER_X).startswith("<|begin_of_text|><|start_header_id|>user")
    md = dict(llama3_md, **{"tokenizer.ggml.add_bos_token": False})
    assert ChatTemplate.from_metadata(md).render(USER_X).startswith("<|begin_of_text|>")


def test_builtin_llama3_agrees_with_the_file_template(llama3_md, apply_template_cases):
    builtin = ChatTemplate.from_metadata(llama3_md, override="llama3")
    assert builtin.name == "llama3"
    for case in apply_template_cases:
        assert builtin.render(case["messages"], case["add_generation_prompt"]) == case["prompt"]


# llama.cpp's tests/test-chat-template.cpp conversation and the `expected_output` strings it
# checks llm_chat_apply_template (src/llama-chat.cpp) against; entries marked "derived" have no
# case there and were worked out by hand from that C++ code.
LLAMA_CPP_CONVERSATION = _msgs(
    ("system", "You are a helpful assistant"),
    ("user", "Hello"),
    ("assistant", "Hi there"),
    ("user", "Who are you"),
    ("assistant", "   I am an assistant   "),
    ("user", "Another question"),
)
LLAMA_CPP_EXPECTED = {
    "chatml": "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi there<|im_end|>\n<|im_start|>user\nWho are you<|im_end|>\n<|im_start|>assistant\n   I am an assistant   <|im_end|>\n<|im_start|>user\nAnother question<|im_end|>\n<|im_start|>assistant\n",
    "llama2": "[INST] You are a helpful assistant\nHello [/INST]Hi there</s>[INST] Who are you [/INST]   I am an assistant   </s>[INST] Another question [/INST]",
    # derived: llama2-sys-bos's case without the "<s>" it adds inside the history
    "llama2-sys": "[INST] <<SYS>>\nYou are a helpful assistant\n<</SYS>>\n\nHello [/INST]Hi there</s>[INST] Who are you [/INST]   I am an assistant   </s>[INST] Another question [/INST]",
    "llama2-sys-bos": "[INST] <<SYS>>\nYou are a helpful assistant\n<</SYS>>\n\nHello [/INST]Hi there</s><s>[INST] Who are you [/INST]   I am an assistant   </s><s>[INST] Another question [/INST]",
    "llama2-sys-strip": "[INST] <<SYS>>\nYou are a helpful assistant\n<</SYS>>\n\nHello [/INST]Hi there</s>[INST] Who are you [/INST]I am an assistant</s>[INST] Another question [/INST]",
    "mistral-v1": " [INST] You are a helpful assistant\n\nHello [/INST] Hi there</s> [INST] Who are you [/INST]    I am an assistant   </s> [INST] Another question [/INST]",
    "mistral-v3": "[INST] You are a helpful assistant\n\nHello[/INST] Hi there</s>[INST] Who are you[/INST] I am an assistant</s>[INST] Another question[/INST]",
    "mistral-v3-tekken": "[INST]You are a helpful assistant\n\nHello[/INST]Hi there</s>[INST]Who are you[/INST]   I am an assistant   </s>[INST]Another question[/INST]",
    "mistral-v7": "[SYSTEM_PROMPT] You are a helpful assistant[/SYSTEM_PROMPT][INST] Hello[/INST] Hi there</s>[INST] Who are you[/INST]    I am an assistant   </s>[INST] Another question[/INST]",
    # derived: mistral-v7 without the spaces
    "mistral-v7-tekken": "[SYSTEM_PROMPT]You are a helpful assistant[/SYSTEM_PROMPT][INST]Hello[/INST]Hi there</s>[INST]Who are you[/INST]   I am an assistant   </s>[INST]Another question[/INST]",
    "phi3": "<|system|>\nYou are a helpful assistant<|end|>\n<|user|>\nHello<|end|>\n<|assistant|>\nHi there<|end|>\n<|user|>\nWho are you<|end|>\n<|assistant|>\n   I am an assistant   <|end|>\n<|user|>\nAnother question<|end|>\n<|assistant|>\n",
    "phi4": "<|im_start|>system<|im_sep|>You are a helpful assistant<|im_end|><|im_start|>user<|im_sep|>Hello<|im_end|><|im_start|>assistant<|im_sep|>Hi there<|im_end|><|im_start|>user<|im_sep|>Who are you<|im_end|><|im_start|>assistant<|im_sep|>   I am an assistant   <|im_end|><|im_start|>user<|im_sep|>Another question<|im_end|><|im_start|>assistant<|im_sep|>",
    # derived: "<|role|>\n" + content + "<|endoftext|>\n", then "<|assistant|>\n"
    "zephyr": "<|system|>\nYou are a helpful assistant<|endoftext|>\n<|user|>\nHello<|endoftext|>\n<|assistant|>\nHi there<|endoftext|>\n<|user|>\nWho are you<|endoftext|>\n<|assistant|>\n   I am an assistant   <|endoftext|>\n<|user|>\nAnother question<|endoftext|>\n<|assistant|>\n",
    "gemma": "<start_of_turn>user\nYou are a helpful assistant\n\nHello<end_of_turn>\n<start_of_turn>model\nHi there<end_of_turn>\n<start_of_turn>user\nWho are you<end_of_turn>\n<start_of_turn>model\nI am an assistant<end_of_turn>\n<start_of_turn>user\nAnother question<end_of_turn>\n<start_of_turn>model\n",
    "llama3": "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWho are you<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nI am an assistant<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nAnother question<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    # derived: system + "\n\n", "<｜User｜>" + content, "<｜Assistant｜>" + content + end-of-sentence
    "deepseek3": "You are a helpful assistant\n\n<｜User｜>Hello<｜Assistant｜>Hi there<｜end▁of▁sentence｜><｜User｜>Who are you<｜Assistant｜>   I am an assistant   <｜end▁of▁sentence｜><｜User｜>Another question<｜Assistant｜>",
}  # fmt: skip


def test_every_builtin_has_a_reference():
    assert set(BUILTIN_NAMES) == set(LLAMA_CPP_EXPECTED)
    assert {"chatml", "llama2", "llama3", "gemma", "phi3", "zephyr", "mistral-v7"} <= set(
        BUILTIN_NAMES
    )


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_builtins_match_llama_cpp(name):
    tmpl = ChatTemplate.from_metadata({}, override=name)
    assert tmpl.name == name
    assert tmpl.render(LLAMA_CPP_CONVERSATION) == LLAMA_CPP_EXPECTED[name]


# system + user + assistant + user, with spaces in the last turn; hand-checked against the C++.
CONVO = _msgs(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "  Bye "))
CONVO_EXPECTED = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n  Bye <|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "gemma": "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n",
    "phi3": "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n<|user|>\n  Bye <|end|>\n<|assistant|>\n",
    "zephyr": "<|system|>\nBe brief.<|endoftext|>\n<|user|>\nHi<|endoftext|>\n<|assistant|>\nHello!<|endoftext|>\n<|user|>\n  Bye <|endoftext|>\n<|assistant|>\n",
    "mistral-v7": "[SYSTEM_PROMPT] Be brief.[/SYSTEM_PROMPT][INST] Hi[/INST] Hello!</s>[INST]   Bye [/INST]",
    "mistral-v3": "[INST] Be brief.\n\nHi[/INST] Hello!</s>[INST]   Bye [/INST]",
    "llama2": "[INST] Be brief.\nHi [/INST]Hello!</s>[INST]   Bye  [/INST]",
    "llama2-sys": "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]Hello!</s>[INST]   Bye  [/INST]",
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CONVO_EXPECTED))
def test_builtins_on_a_four_turn_conversation(name):
    assert ChatTemplate.from_metadata({}, override=name).render(CONVO) == CONVO_EXPECTED[name]


def test_builtins_without_generation_prompt_and_gemma_details():
    msgs = _msgs(("user", "Hi"))
    assert (
        ChatTemplate.from_metadata({}, "chatml").render(msgs, False)
        == "<|im_start|>user\nHi<|im_end|>\n"
    )
    gemma = ChatTemplate.from_metadata({}, "gemma")
    assert (
        gemma.render(msgs, add_generation_prompt=False) == "<start_of_turn>user\nHi<end_of_turn>\n"
    )
    # Systems accumulate (trimmed, unseparated) until a non-model turn; C++ isspace trimming
    # leaves a no-break space alone.
    out = gemma.render(_msgs(("system", " A "), ("system", "B"), ("user", "\u00a0q\n")))
    assert out == "<start_of_turn>user\nAB\n\n\u00a0q<end_of_turn>\n<start_of_turn>model\n"


def test_no_file_template_means_chatml_as_llama_cpp():
    gemma_md = {
        "general.architecture": "gemma3",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": ["<pad>", "<eos>", "<bos>", "<unk>"],
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
    }
    tmpl = ChatTemplate.from_metadata(gemma_md)
    assert (tmpl.name, tmpl.bos_token, tmpl.eos_token, tmpl.strip_bos) == ("chatml", "<bos>", "<eos>", True)
    assert tmpl.render(_msgs(("user", "Hi"))) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    for md in ({"general.architecture": "llama", "tokenizer.ggml.tokens": ["a", "<|start_header_id|>"]},
               {"general.architecture": "qwen3"}, {}):  # fmt: skip
        assert ChatTemplate.from_metadata(md).name == "chatml"
    assert ChatTemplate.from_metadata(gemma_md, override="gemma").name == "gemma"


def test_spm_vocab_defaults_bos_and_eos_ids():
    md = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>"]}
    tmpl = ChatTemplate.from_metadata(md)
    assert (tmpl.bos_token, tmpl.eos_token, tmpl.strip_bos, tmpl.strip_eos) == (
        "<s>",
        "</s>",
        True,
        False,
    )


def test_overrides():
    md = {"tokenizer.chat_template": "file:{{ messages[0].content }}"}
    assert ChatTemplate.from_metadata(md).render(USER_X) == "file:x"
    custom = ChatTemplate.from_metadata(md, override="mine:{{ messages[0].content }}")
    assert custom.render(USER_X) == "mine:x"
    assert ChatTemplate.from_metadata(md, override="zephyr").name == "zephyr"
    with pytest.raises(InvalidRequestError, match="unknown chat template 'nope'.*chatml"):
        ChatTemplate.from_metadata(md, override="nope")
    with pytest.raises(InvalidRequestError, match="does not compile"):
        ChatTemplate.from_metadata(md, override="{% if %}")


def test_broken_file_templates_are_gguf_errors():
    with pytest.raises(GGUFError, match=r"'gguf' does not compile: .*\(line 1\)$"):
        ChatTemplate.from_metadata({"tokenizer.chat_template": "{% for x in %}"})
    with pytest.raises(GGUFError, match="does not compile"):
        ChatTemplate("{{ x ")
    with pytest.raises(GGUFError, match="not a string"):
        ChatTemplate.from_metadata({"tokenizer.chat_template": 5})


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{{ messages.append(1) }}",
        "{% set _ = messages[0].update({'role': 'x'}) %}",
    ],
)
def test_the_sandbox_refuses_unsafe_access(source):
    msgs = _msgs(("user", "x"))
    with pytest.raises(InvalidRequestError, match="SecurityError"):
        ChatTemplate(source).render(msgs)
    assert msgs == _msgs(("user", "x"))


def test_raise_exception_surfaces_the_message():
    strict = ChatTemplate(
        "{% if messages[0].role != 'user' %}{{ raise_exception('Roles must alternate!') }}{% endif %}ok"
    )
    assert strict.render(USER_X) == "ok"
    with pytest.raises(InvalidRequestError) as err:
        strict.render(_msgs(("system", "x")))
    assert str(err.value) == "Roles must alternate!"


@pytest.mark.parametrize(
    "source", ["{{ nope() }}", "{{ 'a' + 1 }}", "{{ messages[5].role }}", "{{ 1 / 0 }}"]
)
def test_render_failures_are_one_line_request_errors(source):
    with pytest.raises(InvalidRequestError, match="^chat template 'custom' failed: ") as err:
        ChatTemplate(source).render(USER_X)
    assert "\n" not in str(err.value)


def test_hf_compatible_helpers():
    tmpl = ChatTemplate(
        "{{ messages[0] | tojson }}|{{ {'a': [1]} | tojson(indent=2) }}|{{ strftime_now('%Y') | length }}"
        "|{% for m in [1, 2, 3] %}{% if m == 2 %}{% break %}{% endif %}{{ m }}{% endfor %}"
        "|{% generation %}gen{% endgeneration %}"
    )
    out = tmpl.render(_msgs(("user", "é <b> & 'q'")))
    assert out == '{"role": "user", "content": "é <b> & \'q\'"}|{\n  "a": [\n    1\n  ]\n}|4|1|gen'


def test_tools_and_extra_kwargs_reach_the_template():
    tmpl = ChatTemplate(
        "{{ tools is none }}|{{ tools | tojson }}|{{ enable_thinking }}|{{ bos_token }}"
    )
    assert tmpl.render(USER_X) == "True|null||"
    tool = {"type": "function", "function": {"name": "f"}}
    assert tmpl.render(USER_X, tools=[tool], enable_thinking=False).startswith("False|[{")
    assert tmpl.render(USER_X, tools=[tool], enable_thinking=False).endswith("|False|")
    with pytest.raises(InvalidRequestError, match="tools must be a list"):
        tmpl.render(USER_X, tools={"a": 1})  # type: ignore[arg-type]


def test_content_parts_are_flattened_like_llama_cpp():
    tmpl = ChatTemplate("{% for m in messages %}[{{ m.content }}]{% endfor %}")

    def parts(*texts: str) -> list[dict[str, str]]:
        return [{"type": "text", "text": t} for t in texts]

    msgs: list[dict[str, Any]] = [
        {"role": "user", "content": parts("a", "b")},
        {"role": "user", "content": parts("", "b")},  # no separator before anything was written
        {"role": "user", "content": parts("a", "", "b")},
        {"role": "user", "content": []},
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "assistant", "tool_calls": [{"type": "function"}]},
    ]
    assert tmpl.render(msgs) == "[a\nb][b][a\n\nb][][][]"
    assert msgs[0]["content"] == parts("a", "b")  # the caller's messages are not modified


@pytest.mark.parametrize(
    "messages,match",
    [
        ([], "non-empty list"),
        ("hi", "non-empty list"),
        ([["user", "hi"]], r"messages\[0\] must be an object"),
        ([{"content": "hi"}], r"messages\[0\]\.role"),
        ([{"role": "", "content": "hi"}], r"messages\[0\]\.role"),
        ([{"role": 1, "content": "hi"}], r"messages\[0\]\.role"),
        ([{"role": "user"}], "'content' or 'tool_calls'"),
        ([{"role": "user", "content": 5}], r"content must be a string, null or a list"),
        ([{"role": "user", "content": ["hi"]}], r"content\[0\] must be an object"),
        ([{"role": "user", "content": [{"text": "hi"}]}], "no string 'type'"),
        ([{"role": "user", "content": [{"type": "text"}]}], "without a string 'text'"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "'image_url': multimodal input is not supported",
        ),
        (
            [{"role": "user", "content": [{"type": "input_audio"}]}],
            "multimodal input is not supported",
        ),
    ],
)
def test_bad_messages_are_client_errors(messages, match):
    with pytest.raises(InvalidRequestError, match=match):
        ChatTemplate.from_metadata({}).render(messages)


def test_chat_template_is_immutable():
    tmpl = ChatTemplate("x", name="n")
    with pytest.raises(AttributeError):
        tmpl.name = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        tmpl._bos = "<s>"
    assert repr(tmpl) == "ChatTemplate(name='n', bos_token='', eos_token='')"


def test_empty_template_or_override_means_none():
    assert ChatTemplate.from_metadata({"tokenizer.chat_template": ""}).name == "chatml"
    assert ChatTemplate.from_metadata({"tokenizer.chat_template": "t"}, override="").name == "gguf"
