"""The gRPC API over a real grpc.aio channel on llama3-tiny: generation, streams, cancellation, chat."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from grpc import aio

from gguf_serve.v1 import inference_pb2 as pb
from gguf_serve.v1 import sampling_pb2 as spb
from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.sampling_params import SamplingParams
from tests.grpc_harness import (
    DATA,
    N_CTX,
    collect,
    greedy,
    llama_cpp_greedy,
    run,
    serve,
    wait_idle,
)
from tests.reference import aligned_steps

# -- generation ---------------------------------------------------------------------------------


def test_streaming_generate_equals_complete_engine_and_llama_cpp(loaded):
    ref = llama_cpp_greedy()
    req = pb.GenerateRequest(text=ref["prompt"], params=greedy(32, n_probs=3))
    ids = loaded.tokenizer.encode(ref["prompt"], add_special=True, parse_special=True)
    direct = Engine(EngineConfig(model_path=str(loaded.path), n_ctx=N_CTX), loaded=loaded).generate(
        [ids], SamplingParams(temperature=0.0, n_predict=32)
    )[0]

    async def main():
        async with serve(loaded) as c:
            return await collect(c.stub.Generate(req)), await c.stub.Complete(req)

    deltas, whole = run(main())
    streamed = [t for d in deltas for t in d.token_ids]
    assert streamed == list(whole.token_ids) == direct == ref["tokens"]
    assert "".join(d.text for d in deltas) == whole.text == ref["content"]
    assert all(d.finish_reason == pb.FINISH_REASON_UNSPECIFIED for d in deltas[:-1])
    last = deltas[-1]
    assert last.finish_reason == whole.finish_reason == pb.FINISH_REASON_LENGTH
    assert last.usage.prompt_tokens == len(ids) and last.usage.completion_tokens == 32
    assert last.timings.predicted_n == 32 and last.timings.prompt_n == len(ids)
    assert len(whole.logprobs) == 32
    errors = []
    for k, step in aligned_steps(ref):  # raw log-probs, as llama.cpp reports them
        lp = whole.logprobs[k]
        assert lp.token_id == step["id"] == lp.top[0].token_id
        assert [t.token_id for t in lp.top] == [t[0] for t in step["top"][:3]]
        errors += [abs(t.logprob - want[1]) for t, want in zip(lp.top, step["top"])]
        assert lp.token_bytes == loaded.tokenizer.token_to_piece(lp.token_id)
    assert sum(errors) / len(errors) <= 0.01  # the bound test_reference_agreement uses


def test_token_id_prompt_and_stop_string(loaded):
    ids = loaded.tokenizer.encode("The capital of France is")
    ref = llama_cpp_greedy()
    stop = ref["content"][20:26]

    async def main():
        async with serve(loaded) as c:
            by_ids = await c.stub.Complete(
                pb.GenerateRequest(token_ids=spb.TokenIds(ids=ids), params=greedy(32))
            )
            stopped = await c.stub.Complete(
                pb.GenerateRequest(text=ref["prompt"], params=greedy(32, stop=[stop]))
            )
            return by_ids, stopped

    by_ids, stopped = run(main())
    assert list(by_ids.token_ids) == ref["tokens"]
    assert stopped.finish_reason == pb.FINISH_REASON_STOP and stopped.stop_word == stop
    assert stopped.text == ref["content"][: ref["content"].index(stop)]


def test_sixteen_concurrent_streams_all_complete(loaded):
    texts = [f"Request number {i}: the quick brown fox" for i in range(16)]
    engine = Engine(EngineConfig(model_path=str(loaded.path), n_ctx=N_CTX), loaded=loaded)
    params = SamplingParams(temperature=0.0, n_predict=12, ignore_eos=True)
    # One at a time: each stream must get what the engine gives that request alone.
    expected = [
        engine.generate([loaded.tokenizer.encode(t, parse_special=True)], params)[0] for t in texts
    ]

    async def main():
        async with serve(loaded) as c:
            calls = [
                collect(
                    c.stub.Generate(pb.GenerateRequest(text=t, params=greedy(12, ignore_eos=True)))
                )
                for t in texts
            ]
            results = await asyncio.gather(*calls)
            return results, await wait_idle(c.ae)

    results, (busy, free, total) = run(main())
    for deltas, want in zip(results, expected):
        assert [t for d in deltas for t in d.token_ids] == want
        assert deltas[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert len({d.request_id for deltas in results for d in deltas}) == 16
    assert busy == 0 and free == total


def test_cancelled_stream_frees_its_blocks(loaded):
    async def main():
        async with serve(loaded) as c:
            call = c.stub.Generate(
                pb.GenerateRequest(text="Once upon a time", params=greedy(-1, ignore_eos=True))
            )
            n = 0
            async for _ in call:
                n += 1
                if n == 3:
                    break
            assert (await c.ae.call(lambda e: e.stats().requests_processing)) == 1
            call.cancel()
            return await wait_idle(c.ae), await c.stub.Complete(
                pb.GenerateRequest(text="Hi", params=greedy(4))
            )

    (busy, free, total), after = run(main())
    assert busy == 0 and free == total
    assert after.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)


def test_passed_deadline_aborts_the_request(loaded):
    async def main():
        async with serve(loaded) as c:
            req = pb.GenerateRequest(text="Once upon a time", params=greedy(-1, ignore_eos=True))
            with pytest.raises(aio.AioRpcError) as err:
                await collect(c.stub.Generate(req, timeout=0.3))
            return err.value.code(), await wait_idle(c.ae)

    code, (busy, free, total) = run(main())
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert busy == 0 and free == total


def test_chat_renders_the_models_template(loaded):
    with open(DATA / "llama3_tiny_apply_template.jsonl") as f:
        case = json.loads(f.readline())  # llama.cpp's /apply-template output for these messages

    async def main():
        async with serve(loaded) as c:
            messages = [
                pb.ChatMessage(role=m["role"], content=m["content"]) for m in case["messages"]
            ]
            chat = await collect(
                c.stub.Chat(pb.ChatRequest(messages=messages, params=greedy(8, ignore_eos=True)))
            )
            gen = await c.stub.Complete(
                pb.GenerateRequest(text=case["prompt"], params=greedy(8, ignore_eos=True))
            )
            return chat, gen

    chat, gen = run(main())
    assert [t for d in chat for t in d.token_ids] == list(gen.token_ids)
    assert chat[-1].usage.prompt_tokens == gen.usage.prompt_tokens
