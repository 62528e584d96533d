"""POST /infill: the FIM prompt assembled from a model's FIM tokens as llama.cpp does, then a /completion."""

import httpx
import pytest

from http_api.cli import ServerSettings
from http_api.testing import LiveServer
from runtime.errors import InvalidRequestError
from runtime.gguf.reader import GGUFFile
from runtime.infill import ExtraChunk, fim_ids, infill_prompt
from runtime.tokenizer import Tokenizer
from scripts.make_tiny_gguf import BOS_ID, write_tiny_gguf

PRE, SUF, MID, REP, SEP = 300, 301, 302, 303, 304
FIM = {
    "tokenizer.ggml.fim_pre_token_id": PRE,
    "tokenizer.ggml.fim_suf_token_id": SUF,
    "tokenizer.ggml.fim_mid_token_id": MID,
}
REPO = {"tokenizer.ggml.fim_rep_token_id": REP, "tokenizer.ggml.fim_sep_token_id": SEP}


@pytest.fixture(scope="module")
def fim_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("fim") / "fim.gguf", metadata=FIM)


@pytest.fixture(scope="module")
def metadata(fim_gguf):
    return dict(GGUFFile(fim_gguf).metadata)


def tokenizer(metadata, **keys) -> Tokenizer:
    md = {k: v for k, v in metadata.items() if not k.startswith("tokenizer.ggml.fim_")}
    return Tokenizer.from_metadata({**md, **keys})


def text(tok, s):
    return tok.encode(s, add_special=False, parse_special=False)


def test_the_plain_layout(metadata):
    tok = tokenizer(metadata, **FIM)
    ids = infill_prompt(tok, "def f(", "return x", [], text(tok, "a"), 512, -1, 4096)
    want = [BOS_ID, PRE, *text(tok, "def f("), *text(tok, "a"), SUF, *text(tok, "return x"), MID]
    assert ids == want
    spm = infill_prompt(tok, "def f(", "return x", [], [], 512, -1, 4096, spm_infill=True)
    assert spm == [BOS_ID, SUF, *text(tok, "return x"), PRE, *text(tok, "def f("), MID]


def test_the_repo_level_layout_with_extra_files(metadata):
    tok = tokenizer(metadata, **FIM, **REPO)
    extra = [ExtraChunk("x = 1", "a.py"), ExtraChunk("y = 2")]
    ids = infill_prompt(tok, "p", "s", extra, [], 512, -1, 4096)
    head = [REP, *text(tok, "myproject\n")]
    head += [SEP, *text(tok, "a.py\n"), *text(tok, "x = 1")]
    head += [SEP, *text(tok, "tmp\n"), *text(tok, "y = 2")]
    head += [SEP, *text(tok, "filename\n")]
    assert ids == head + [BOS_ID, PRE, *text(tok, "p"), SUF, *text(tok, "s"), MID]
    # without FIM_SEP each chunk is introduced by a snippet line
    tok = tokenizer(metadata, **FIM)
    ids = infill_prompt(tok, "p", "s", extra[:1], [], 512, -1, 4096)
    assert ids[: ids.index(BOS_ID)] == text(tok, "\n\n--- snippet ---\n\n") + text(tok, "x = 1")


def test_budgets_trim_prefix_suffix_and_extra(metadata):
    tok = tokenizer(metadata, **FIM, **REPO)
    prefix, suffix = list(range(400, 440)), list(range(500, 540))
    extra = [ExtraChunk("the of and to in is it", "f")]
    # n_batch 16: the prefix keeps its last 12, the suffix its first 4 - 2 - 1 = 1 (one prompt token)
    ids = infill_prompt(tok, prefix, suffix, extra, [7], 16, 2, 24)
    full_extra = [REP, *text(tok, "myproject\n"), SEP, *text(tok, "f\n"), *text(tok, extra[0].text)]
    full_extra += [SEP, *text(tok, "filename\n")]
    n_extra = 24 - 16 - 2 * 2  # what the context has left after a batch and twice n_predict
    assert ids == full_extra[-n_extra:] + [BOS_ID, PRE, *prefix[-12:], 7, SUF, suffix[0], MID]


def test_older_metadata_names_and_missing_tokens(metadata):
    old = {
        "tokenizer.ggml.prefix_token_id": PRE,
        "tokenizer.ggml.suffix_token_id": SUF,
        "tokenizer.ggml.middle_token_id": MID,
    }
    assert fim_ids(tokenizer(metadata, **old)) == (PRE, SUF, MID)
    with pytest.raises(InvalidRequestError) as e:
        fim_ids(tokenizer(metadata, **{"tokenizer.ggml.fim_pre_token_id": PRE}))
    assert str(e.value) == (
        "Infill is not supported by this model: suffix token is missing. middle token is missing."
    )


def test_infill_route_equals_completion_of_the_fim_prompt(fim_gguf):
    settings = ServerSettings(model=str(fim_gguf), n_threads=1, n_ctx=512, n_parallel=2)
    with LiveServer(settings) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        opts = {"n_predict": 6, "temperature": 0, "ignore_eos": True}
        body = {"input_prefix": "def f(", "input_suffix": "return x", "prompt": "a", **opts}
        body["input_extra"] = [{"filename": "a.py", "text": "x = 1"}]
        r = c.post("/infill", json=body)
        assert r.status_code == 200, r.text
        tok = srv.state.loaded.tokenizer
        ids = infill_prompt(
            tok,
            "def f(",
            "return x",
            [ExtraChunk("x = 1", "a.py")],
            text(tok, "a"),
            settings.n_batch,
            -1,
            srv.state.loaded.n_ctx,
        )
        want = c.post("/completion", json={"prompt": ids, **opts}).json()
        got = r.json()
        assert got["tokens"] == want["tokens"] and got["content"] == want["content"]
        assert got["tokens_evaluated"] == len(ids) and got["stop_type"] == "limit"
        stream = c.post("/infill", json={**body, "stream": True})
        assert stream.status_code == 200 and stream.text.startswith("data: ")
        for bad, message in [
            ({"input_suffix": "x"}, '"input_prefix" is required'),
            ({"input_prefix": 1, "input_suffix": "x"}, '"input_prefix" must be a string'),
            (
                {"input_prefix": "", "input_suffix": "", "input_extra": {}},
                '"input_extra" must be an array',
            ),
            (
                {"input_prefix": "", "input_suffix": "", "input_extra": [{"filename": "a"}]},
                '"text" field',
            ),
            ({"input_prefix": "", "input_suffix": "", "prompt": 5}, "prompt: must be str"),
            ({"input_prefix": "", "input_suffix": "", "temperature": "hot"}, "temperature"),
        ]:
            r = c.post("/infill", json=bad)
            assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def test_the_default_model_has_no_fim_tokens(default_model_path):
    tok = Tokenizer.from_metadata(GGUFFile(default_model_path).metadata)
    with pytest.raises(InvalidRequestError, match="prefix token is missing"):
        fim_ids(tok)  # so /infill is a 400 there (llama3-tiny's case: tests/test_http_errors.py)
