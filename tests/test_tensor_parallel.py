"""Tensor parallelism at work: 2 gloo processes generating what 1 process does, and the server under torchrun
(the sharding math: tests/test_tensor_parallel_shards.py)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.loader import load_model
from runtime.sampling_params import SamplingParams
from scripts.make_tiny_gguf import write_tiny_gguf
from tests.tp_harness import spawn

N_PREDICT = 16


# -- 2 processes (gloo) generate what 1 process does ------------------------------------


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, vocab) for _ in range(n)] for n in (5, 23, 40)]


def _one_process(path, prompts, n_predict=N_PREDICT, n_ctx=1024, **overrides: str) -> list[list[int]]:
    engine = Engine(EngineConfig(model_path=str(path), n_ctx=n_ctx, **overrides), load_model(path))
    return engine.generate(
        prompts, SamplingParams(temperature=0.0, n_predict=n_predict, ignore_eos=True)
    )


def _two_processes(path, prompts, n_predict=N_PREDICT, n_ctx=1024, **overrides: str) -> dict:
    out = spawn([str(path), json.dumps(prompts), str(n_predict), str(n_ctx), json.dumps(overrides)], world=2)
    assert out[1] == ""  # rank 1 follows; only rank 0 answers
    return json.loads(out[0])


@pytest.mark.parametrize(
    "arch, qtype, kw",
    [
        ("llama", "Q4_0", {}),
        ("qwen2", "Q8_0", {}),  # q/k/v biases
        ("qwen3", "Q4_K", {}),  # q_norm/k_norm, K-quant blocks of 256
        ("gemma3", "Q4_K", dict(n_kv_heads=1)),  # one KV head, replicated on both ranks
    ],
)
def test_two_processes_generate_what_one_does(tmp_path, arch, qtype, kw):
    """float32 decode rows: the ranks' partial sums of a row-parallel product are added in
    another order than one process's, and int8 rows' 8-bit rounding of the next input can
    turn that last bit into a different token at a near-tie on these tiny random models."""
    path = write_tiny_gguf(tmp_path / f"{arch}.gguf", arch, qtype, **kw)
    prompts = _prompts(512)
    expected = _one_process(path, prompts, decode_dtype="float32")
    out = _two_processes(path, prompts, decode_dtype="float32")
    cfg = load_model(path).config
    assert out["shard"] == {
        "n_heads": cfg.n_heads // 2,
        "n_kv_heads": max(1, cfg.n_kv_heads // 2),
        "ffn": cfg.ffn // 2,
    }
    got = out["ids"]
    assert all(len(ids) == N_PREDICT for ids in got)
    _same_but_near_ties(path, prompts, expected, got, decode_dtype="float32")


def _same_but_near_ties(path, prompts, expected, got, **overrides: str) -> None:
    """got == expected, except that a sequence may part ways at a near-tie: where it does, the
    one process's top two log-probs are within 0.01 and the other run took the runner-up."""
    params = SamplingParams(temperature=0.0, n_predict=N_PREDICT, ignore_eos=True, n_probs=2)
    for prompt, want, ids in zip(prompts, expected, got):
        d = next((i for i, (a, b) in enumerate(zip(want, ids)) if a != b), None)
        if d is None:
            continue
        engine = Engine(EngineConfig(model_path=str(path), n_ctx=1024, **overrides), load_model(path))
        rid = engine.add_request(prompt, params)
        steps = []
        while engine.has_unfinished():
            steps += [lp.top for o in engine.step() if o.request_id == rid for lp in o.logprobs]
        (first, lp1), (second, lp2) = steps[d][:2]
        assert (first, second) == (want[d], ids[d]) and lp1 - lp2 < 0.01, (d, steps[d])


@pytest.mark.parametrize("arch, qtype", [("llama", "Q5_0"), ("qwen3", "Q4_K")])
def test_int8_decode_rows_split_as_one_process_runs_them(tmp_path, arch, qtype):
    """--decode-dtype int8: the shards' cuts fall on whole blocks of 32, so each rank
    quantizes its part of a row as one process does; the decode-row count reaches rank 1.
    Prompt rows in float32: the bfloat16 GEMM's roundings of the next layer's input would
    magnify the split sums' last-bit differences into token flips on this tiny random model."""
    path = write_tiny_gguf(tmp_path / f"{arch}.gguf", arch, qtype)
    prompts = _prompts(512, seed=1)
    expected = _one_process(path, prompts, decode_dtype="int8", gemm_dtype="float32")
    # int8 rows change this model's tokens
    assert expected != _one_process(path, prompts, decode_dtype="float32", gemm_dtype="float32")
    assert _two_processes(path, prompts, decode_dtype="int8", gemm_dtype="float32")["ids"] == expected


@pytest.mark.parametrize(
    "arch, qtype, kw",
    [("llama", "Q8_0", {}), ("gemma3", "Q4_K", dict(n_kv_heads=1))],  # 2 KV heads split; 1 replicated
)
def test_slot_files_move_between_one_and_two_processes(tmp_path, arch, qtype, kw):
    """--slot-save-path under tensor parallelism: rank 0 gathers every rank's KV heads into
    the file and hands each rank its heads back, so a file saved by either restores on
    the other and the continuation is what it would have been."""
    from tests.tp_harness import slots

    path = write_tiny_gguf(tmp_path / f"{arch}.gguf", arch, qtype, **kw)
    prompt = _prompts(512)[2]  # 41 tokens
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()

    def engine(save_dir):
        # float32 products: bfloat16's and int8's roundings would take the ranks' split sums apart (see above)
        cfg = EngineConfig(
            model_path=str(path), n_ctx=1024, slot_save_path=str(save_dir), gemm_dtype="float32", decode_dtype="float32"
        )
        return Engine(cfg, load_model(path))

    def two_processes(save_dir, action) -> dict:
        overrides = json.dumps({"gemm_dtype": "float32", "decode_dtype": "float32"})
        out = spawn([str(path), json.dumps([prompt]), "8", "1024", overrides, str(save_dir), action], world=2)
        return json.loads(out[0])

    saved_one = slots(engine(one), prompt, "save")
    saved_two = two_processes(two, "save")
    assert saved_two["ids"] == saved_one["ids"] and saved_two["n_saved"] == saved_one["n_saved"] == 48
    a = torch.load(one / "slot.bin", weights_only=True)
    b = torch.load(two / "slot.bin", weights_only=True)
    assert a["tokens"] == b["tokens"] and a["n_kv_blocks"] == b["n_kv_blocks"] > 0
    for x, y in zip(a["k"] + a["v"], b["k"] + b["v"]):  # every head, from both ranks
        assert x.shape == y.shape and x.shape[2] == load_model(path).config.n_kv_heads
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    # a fresh engine computing the same context itself: what a restore must reproduce
    context = a["tokens"]
    expected = engine(one).generate([context + [7, 8, 9]], SamplingParams(temperature=0.0, n_predict=8, ignore_eos=True))[0]
    restored_by_two = two_processes(one, "restore")  # the one-process file, on two ranks
    restored_by_one = slots(engine(two), prompt, "restore")  # the two-process file, on one
    for r in (restored_by_two, restored_by_one):
        assert r["n_restored"] == 48 and r["cached_blocks"] == a["n_kv_blocks"]
        assert r["ids"] == expected


def test_two_processes_shift_the_context_as_one_does(tmp_path):
    """A model with a 64-token context filled twice over: the KV moves of each context
    shift (the pool has room for them) reach rank 1."""
    path = write_tiny_gguf(tmp_path / "llama.gguf", "llama", "Q8_0", context_length=64)
    prompt = _prompts(512)[2]  # 41 tokens
    expected = _one_process(path, [prompt], n_predict=90)
    got = _two_processes(path, [prompt], n_predict=90)["ids"]
    assert got == expected and len(got[0]) == 90


def test_two_processes_on_the_default_model(default_model_path):
    loaded = load_model(default_model_path)
    tok = loaded.tokenizer
    texts = [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time, in a small village,",
    ]
    prompts = [tok.encode(t) for t in texts]
    # float32 decode rows, as above (with the default int8 rows one of these three parts from
    # one process's tokens after 5 of them: a near-tie)
    engine = Engine(EngineConfig(model_path=str(default_model_path), n_ctx=1024, decode_dtype="float32"), loaded)
    expected = engine.generate(
        prompts, SamplingParams(temperature=0.0, n_predict=N_PREDICT, ignore_eos=True)
    )
    assert _two_processes(default_model_path, prompts, decode_dtype="float32")["ids"] == expected


# -- the server under torchrun -----------------------------------------------------------


def test_tensor_split_without_torchrun_is_refused(tmp_path, monkeypatch, capsys):
    from http_api.server import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    path = write_tiny_gguf(tmp_path / "llama.gguf", "llama", "Q8_0")
    assert main(["-m", str(path), "-ts", "1,1", "--log-disable"]) == 1
    err = capsys.readouterr().err
    assert "names 2 devices but 1 process run: launch with torchrun --nproc-per-node 2" in err


def test_launch_torchrun_serves_from_rank_0(tmp_path):
    """scripts/launch_torchrun.sh 2: rank 0 alone binds the port and answers what 1 process does."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    import httpx

    from tests.tp_harness import ROOT, free_port

    path = write_tiny_gguf(tmp_path / "llama.gguf", "llama", "Q8_0")
    prompt = _prompts(512)[1]
    expected = _one_process(path, [prompt])[0]
    port = free_port()
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    argv = ["bash", "scripts/launch_torchrun.sh", "2", "-m", str(path), "--port", str(port)]
    proc = subprocess.Popen(
        [*argv, "-t", "1", "-ts", "1,1"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.5)
        body = {"prompt": prompt, "n_predict": N_PREDICT, "temperature": 0, "ignore_eos": True}
        r = httpx.post(f"{url}/completion", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["tokens"] == expected
        # SIGTERM to torchrun reaches every rank: rank 0 drains the stream in flight while
        # rank 1 keeps following its steps, then both stop.
        long = {"prompt": prompt, "n_predict": 400, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/completion", json=long, timeout=120) as r:
            lines = (json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: "))
            assert not next(lines)["stop"]
            proc.send_signal(signal.SIGTERM)
            last = list(lines)[-1]
        assert last["stop"] and last["stop_type"] == "limit" and last["tokens_predicted"] == 400
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert "tensor-parallel rank 1/2 ready" in out
    assert "tensor-parallel rank 1 stopped after" in out, out[-3000:]
