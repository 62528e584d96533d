"""Chat templates: llama.cpp's /apply-template outputs, the built-ins, the sandbox, and bad messages."""

import json
from pathlib import Path

import pytest

from runtime.chat_template import BUILTIN_NAMES, ChatTemplate
from runtime.errors import GGUFError, InvalidRequestError
from runtime.gguf.reader import GGUFFile

DATA = Path(__file__).parent / "data"
CONVO = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "  Bye "},
]


@pytest.fixture(scope="module")
def llama3_md(llama3_tiny_path):
    return GGUFFile(llama3_tiny_path).metadata


def test_llama3_file_template_matches_llama_cpp(llama3_md):
    tmpl = ChatTemplate.from_metadata(llama3_md)
    assert tmpl.name == "gguf" and tmpl.bos_token == "<|begin_of_text|>"
    cases = [json.loads(line) for line in open(DATA / "llama3_tiny_apply_template.jsonl")]
    assert cases
    for c in cases:
        assert tmpl.render(c["messages"], c["add_generation_prompt"]) == c["prompt"]


def test_builtin_llama3_equals_the_file_template(llama3_md):
    file_tmpl = ChatTemplate.from_metadata(llama3_md)
    builtin = ChatTemplate.from_metadata(llama3_md, override="llama3")
    assert builtin.render(CONVO) == file_tmpl.render(CONVO)


# Expected strings written from llama.cpp's C++ implementations (src/llama-chat.cpp).
EXPECTED = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n  Bye <|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    "Hello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "gemma": "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
    "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n",
    "phi3": "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n"
    "<|user|>\n  Bye <|end|>\n<|assistant|>\n",
    "zephyr": "<|system|>\nBe brief.<|endoftext|>\n<|user|>\nHi<|endoftext|>\n<|assistant|>\nHello!<|endoftext|>\n"
    "<|user|>\n  Bye <|endoftext|>\n<|assistant|>\n",
    "mistral-v7": "[SYSTEM_PROMPT] Be brief.[/SYSTEM_PROMPT][INST] Hi[/INST] Hello!</s>[INST]   Bye [/INST]",
    "llama2": "[INST] Be brief.\nHi [/INST]Hello!</s>[INST]   Bye  [/INST]",
    "llama2-sys": "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]Hello!</s>[INST]   Bye  [/INST]",
}


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_builtins_render_as_llama_cpp(name):
    assert ChatTemplate.from_metadata({}, override=name).render(CONVO) == EXPECTED[name]


def test_no_template_in_the_file_means_chatml_as_llama_cpp():
    md = {"general.architecture": "gemma3", "tokenizer.ggml.model": "llama"}
    assert ChatTemplate.from_metadata(md).name == "chatml"


def test_custom_override_text_content_parts_and_tojson():
    tmpl = ChatTemplate.from_metadata({}, override="{{ messages | tojson }}|{{ add_generation_prompt }}")
    out = tmpl.render([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "é"}]}])
    assert out == '[{"role": "user", "content": "a\\né"}]|True'


@pytest.mark.parametrize(
    "source",
    ["{{ ''.__class__.__mro__[1].__subclasses__() }}", "{{ messages.__class__.__init__.__globals__ }}"],
)
def test_the_sandbox_refuses_unsafe_access(source):
    with pytest.raises(InvalidRequestError):
        ChatTemplate(source).render([{"role": "user", "content": "x"}])


def test_raise_exception_and_compile_errors():
    strict = ChatTemplate("{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok")
    assert strict.render([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(InvalidRequestError, match="first must be user"):
        strict.render([{"role": "system", "content": "x"}])
    with pytest.raises(GGUFError, match="does not compile"):
        ChatTemplate("{% for x in %}")


@pytest.mark.parametrize(
    "messages,match",
    [
        ([], "non-empty"),
        ("hi", "non-empty"),
        ([["user", "hi"]], "must be an object"),
        ([{"content": "hi"}], "role"),
        ([{"role": "user", "content": 5}], "content must be"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "image_url"),
    ],
)
def test_bad_messages_are_client_errors(messages, match):
    with pytest.raises(InvalidRequestError, match=match):
        ChatTemplate.from_metadata({}).render(messages)
