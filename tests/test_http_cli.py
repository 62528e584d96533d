"""The command line: llama.cpp's flags map to the server's settings, or stop the start with one line."""

import logging
from pathlib import Path

import pytest

from http_api.cli import UsageError, parse_args
from http_api.server import main
from http_api.state import engine_config

ROOT = Path(__file__).parent.parent


def test_defaults_are_llama_cpp_s():
    s = parse_args([])
    assert (s.host, s.port, s.n_ctx, s.n_predict, s.timeout, s.model) == (
        "127.0.0.1",
        8080,
        4096,
        -1,
        600,
        None,
    )
    assert s.slots and not s.metrics and s.api_keys == () and s.n_batch == 512 and s.warmup
    assert not parse_args(["--no-warmup"]).warmup and parse_args(["--no-warmup", "--warmup"]).warmup


def test_flags_map_to_settings(tmp_path, llama3_tiny_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("k2\n\n  k3 \n")
    s = parse_args([
        "-m", str(llama3_tiny_path), "-c", "512", "-np", "2", "-b", "256", "-ub", "1024", "-t", "2", "-n", "64",
        "--host", "0.0.0.0", "--port", "9000", "-a", "tiny", "--api-key", "k1", "--api-key-file", str(keys),
        "--metrics", "--no-slots", "--chat-template", "chatml", "--dtype", "bfloat16", "-to", "30",
        "--log-format", "json", "-cb", "--threads-http", "4", "-tb", "3", "--weights", "dense", "--no-mmap",
        "--gemm-dtype", "float32", "--mlock", "--decode-dtype", "int8",
    ])  # fmt: skip
    assert (s.n_threads_batch, s.weights, s.use_mmap, s.gemm_dtype, s.mlock) == (3, "dense", False, "float32", True)
    assert engine_config(s).decode_dtype == "int8"
    assert (s.model, s.n_ctx, s.n_parallel, s.n_batch, s.n_threads, s.n_predict) == (
        str(llama3_tiny_path),
        512,
        2,
        256,
        2,
        64,
    )
    assert (s.host, s.port, s.alias, s.api_keys) == ("0.0.0.0", 9000, "tiny", ("k1", "k2", "k3"))
    assert s.metrics and not s.slots and s.chat_template == "chatml" and s.dtype == "bfloat16"
    assert s.timeout == 30 and s.log_format == "json"
    assert not parse_args(["--slots-endpoint-disable"]).slots
    d = parse_args([])
    assert (d.weights, d.use_mmap, d.n_threads_batch) == ("quant", True, 0)
    assert engine_config(d).decode_dtype == "auto"


@pytest.mark.parametrize(
    "argv,words",
    [(["--pooling", "rank"], "rank"), (["--max-queue", "-1"], "max-queue"),
     (["--lora", "a.gguf"], "lora"), (["--lora-base", "a"], "lora-base"), (["--mmproj", "p.gguf"], "mmproj"),
     (["-hf", "org/repo"], "download"), (["-hff", "f.gguf"], "download"), (["-mu", "http://x/m.gguf"], "download"),
     (["--slot-save-path", __file__], "slot-save-path"), (["--grp-attn-n", "2"], "grp-attn"), (["-gaw", "512"], "grp-attn"),
     (["-nocb"], "continuous batching"), (["--shutdown-timeout", "nan"], "shutdown-timeout"), (["-ts", "3,1"], "tensor-split .* only an even split"), (["-ts", "x"], "tensor-split"),
     (["--numa", "distribute"], "numa"), (["-spf", "x.json"], "system-prompt"),
     (["-m", "/no/such/model.gguf"], "no such file"), (["--chat-template", "nonsense"], "unknown template"),
     (["--ssl-key-file", "k.pem"], "ssl"), (["-np", "0"], "parallel"), (["--path", "/no/such/dir"], "--path")],
)  # fmt: skip
def test_flags_that_cannot_be_honoured_stop_the_start(argv, words):
    with pytest.raises(UsageError, match=words):
        parse_args(argv)


@pytest.fixture
def own_logging():
    """main() sets up logging for the process; put the loggers back as pytest had them."""
    names = ("gguf_serve", "runtime", "uvicorn", "uvicorn.error")
    saved = [(lg, lg.handlers[:], lg.propagate, lg.level) for lg in map(logging.getLogger, names)]
    yield
    for lg, handlers, propagate, level in saved:
        lg.handlers, lg.propagate, lg.level = handlers, propagate, level


def test_main_prints_one_line_and_fails(capsys, own_logging):
    assert main(["--numa", "distribute"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --numa is not supported yet"]


def test_help_groups_flags_as_llama_cpp_does(capsys, own_logging):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for text in (
        "----- common params -----",
        "----- server params -----",
        "--ctx-size",
        "--api-key",
        "--n-gpu-layers",
    ):
        assert text in out


def test_gpu_flags_on_cpu_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="gguf_serve"):
        parse_args(["-ngl", "99"])
    assert "no effect" in caplog.text


def test_console_script_is_the_server():
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["gguf-serve"] == "http_api.server:main"
    assert scripts["gguf-serve-generate"] == "runtime.cli:generate_main"
