"""The gRPC API's errors, tokens, model info, slots, health, reflection and auth over a real channel."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gguf_serve.v1 import inference_pb2 as pb
from gguf_serve.v1 import inference_pb2_grpc as pb_grpc
from gguf_serve.v1 import sampling_pb2 as spb
from grpc_api.server import SERVICE_NAME, start_grpc
from runtime.errors import InvalidRequestError
from runtime.sampling_params import SamplingParams
from tests.grpc_harness import (
    DATA,
    N_CTX,
    collect,
    greedy,
    new_engine,
    run,
    serve,
)

# -- errors --------------------------------------------------------------------------------------


def runtime_message(**kw) -> str:
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kw)
    return str(e.value)


@pytest.mark.parametrize(
    "request_kw, message",
    [
        ({"text": "x", "params": spb.SamplingParams(top_p=2)}, runtime_message(top_p=2.0)),
        ({"text": "x", "params": spb.SamplingParams(n_predict=-5)}, runtime_message(n_predict=-5)),
        ({"text": ""}, "the prompt is empty"),
        ({"token_ids": spb.TokenIds(ids=[])}, "the prompt is empty"),
        (
            {"token_ids": spb.TokenIds(ids=[1, 200_000])},
            "token id 200000 is out of range [0, 128256)",
        ),
        (
            {"text": "x", "params": spb.SamplingParams(grammar="root ::= foo")},
            "Failed to parse grammar: Rule 'foo' not found",
        ),
        (
            {"text": "x", "params": spb.SamplingParams(samplers=["bogus"])},
            "samplers: unknown sampler 'bogus'",
        ),
        ({"text": "x", "id_slot": 99}, "id_slot must be -1 or in [0, 8), got 99"),
    ],
)
def test_bad_parameters_are_invalid_argument(loaded, request_kw, message):
    async def main():
        async with serve(loaded) as c:
            req = pb.GenerateRequest(**request_kw)
            errs = []
            for call in (lambda: c.stub.Complete(req), lambda: collect(c.stub.Generate(req))):
                with pytest.raises(aio.AioRpcError) as e:
                    await call()
                errs.append((e.value.code(), e.value.details()))
            return errs

    for code, details in run(main()):
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details == message


def test_unsupported_calls_are_unimplemented(loaded):
    async def main():
        async with serve(loaded) as c:
            out = []
            for call in (
                c.stub.Embed(pb.EmbedRequest(inputs=[pb.EmbedInput(text="hi")])),
                c.stub.SaveSlot(pb.SaveSlotRequest(id_slot=0, filename="a.bin")),
                c.stub.RestoreSlot(pb.RestoreSlotRequest(id_slot=0, filename="a.bin")),
            ):
                with pytest.raises(aio.AioRpcError) as e:
                    await call
                out.append((e.value.code(), e.value.details()))
            return out

    errs = run(main())
    assert all(code == grpc.StatusCode.UNIMPLEMENTED for code, _ in errs)
    assert errs[0][1] == "This server does not support embeddings. Start it with `--embeddings`"


# -- tokens, model, slots --------------------------------------------------------------------------


def test_tokenize_detokenize_round_trip(loaded):
    with open(DATA / "llama3_tiny_tokenize.jsonl") as f:
        cases = [json.loads(line) for line in f][:20]

    async def main():
        async with serve(loaded) as c:
            out = []
            for case in cases:
                toks = await c.stub.Tokenize(
                    pb.TokenizeRequest(text=case["text"], with_pieces=True)
                )
                text = await c.stub.Detokenize(pb.DetokenizeRequest(tokens=toks.tokens))
                out.append((toks, text.text))
            with pytest.raises(aio.AioRpcError) as e:
                await c.stub.Detokenize(pb.DetokenizeRequest(tokens=[300_000]))
            bos = await c.stub.Tokenize(pb.TokenizeRequest(text="hi", add_special=True))
            return out, e.value, bos

    out, err, bos = run(main())
    for case, (toks, text) in zip(cases, out):
        assert list(toks.tokens) == case["tokens"]  # llama.cpp's /tokenize (add_special false)
        assert b"".join(p.piece_bytes for p in toks.pieces) == text.encode()
        assert text == loaded.tokenizer.decode(case["tokens"])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "300000" in err.details()
    assert bos.tokens[0] == loaded.tokenizer.bos_id


def test_model_info(loaded):
    async def main():
        async with serve(loaded) as c:
            return await c.stub.ModelInfo(pb.ModelInfoRequest())

    info = run(main())
    mc = loaded.config
    assert info.architecture == "llama" == mc.arch
    assert info.vocab_size == mc.vocab_size == 128256
    assert info.context_length == mc.context_length
    assert info.n_ctx == min(N_CTX, mc.context_length)
    assert info.file_type == "ALL_F32" and info.file_type_id == 0
    assert info.slots == 8
    assert info.model_path == str(loaded.path) and info.alias == loaded.path.name
    assert info.bos_token_id == loaded.tokenizer.bos_id and info.add_bos
    assert info.chat_template == "gguf"


def test_list_and_erase_slots(loaded, tmp_path):
    async def main():
        holder = {"ae": new_engine(loaded, slot_save_path=str(tmp_path))}
        async with serve(loaded, holder=holder) as c:
            call = c.stub.Generate(
                pb.GenerateRequest(text="Hi", params=greedy(-1, ignore_eos=True), id_slot=3)
            )
            await call.read()
            busy = await c.stub.ListSlots(pb.ListSlotsRequest())
            with pytest.raises(aio.AioRpcError) as e:
                await c.stub.EraseSlot(pb.EraseSlotRequest(id_slot=3))
            erased = await c.stub.EraseSlot(pb.EraseSlotRequest(id_slot=0))
            call.cancel()
            return busy, e.value.code(), erased

    busy, busy_code, erased = run(main())
    assert len(busy.slots) == 8
    assert [s.id for s in busy.slots if s.is_processing] == [3]
    assert busy.slots[3].request_id.startswith("grpc-") and busy.slots[3].n_prompt_tokens == 2
    assert busy_code == grpc.StatusCode.FAILED_PRECONDITION
    assert erased.id_slot == 0 and erased.n_erased == 0


# -- health, reflection, auth ----------------------------------------------------------------------


def test_health_not_serving_while_loading_then_serving(loaded):
    holder: dict = {"ae": None}

    async def main():
        async with serve(loaded, holder=holder) as c:
            health = health_pb2_grpc.HealthStub(c.channel)
            check = [
                (await health.Check(health_pb2.HealthCheckRequest(service=s))).status
                for s in ("", SERVICE_NAME)
            ]
            watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
            first = (await watch.read()).status
            with pytest.raises(aio.AioRpcError) as e:
                await c.stub.ModelInfo(pb.ModelInfoRequest())
            holder["ae"] = new_engine(loaded)  # the model has loaded
            holder["ae"].start()
            then = (await asyncio.wait_for(watch.read(), 10)).status
            watch.cancel()
            after = (await health.Check(health_pb2.HealthCheckRequest())).status
            return check, first, e.value, then, after, await c.stub.ModelInfo(pb.ModelInfoRequest())

    check, first, err, then, after, info = run(main())
    not_serving, serving = (
        health_pb2.HealthCheckResponse.NOT_SERVING,
        health_pb2.HealthCheckResponse.SERVING,
    )
    assert check == [not_serving, not_serving] and first == not_serving
    assert err.code() == grpc.StatusCode.UNAVAILABLE and err.details() == "the model is loading"
    assert then == serving and after == serving
    assert info.architecture == "llama"


def test_reflection_lists_and_describes_the_service(loaded):
    async def main():
        async with serve(loaded) as c:
            stub = reflection_pb2_grpc.ServerReflectionStub(c.channel)
            reqs = [
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
            ]
            return [r async for r in stub.ServerReflectionInfo(iter(reqs))]

    listed, described = run(main())
    names = {s.name for s in listed.list_services_response.service}
    assert {
        SERVICE_NAME,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names
    assert described.file_descriptor_response.file_descriptor_proto  # grpcurl can describe it


def test_api_keys_are_enforced(loaded):
    async def main():
        async with serve(loaded, api_keys=["k-one", "k-two"]) as c:
            codes = []
            for md in ((), (("authorization", "Bearer nope"),), (("authorization", "k-one"),)):
                with pytest.raises(aio.AioRpcError) as e:
                    await c.stub.ModelInfo(pb.ModelInfoRequest(), metadata=md)
                codes.append((e.value.code(), e.value.details()))
            with pytest.raises(aio.AioRpcError) as e:  # a streaming call is refused the same way
                await collect(c.stub.Generate(pb.GenerateRequest(text="x", params=greedy(2))))
            codes.append((e.value.code(), e.value.details()))
            with pytest.raises(aio.AioRpcError) as e:  # reflection too (grpcurl -H sends the key)
                reflect = reflection_pb2_grpc.ServerReflectionStub(c.channel)
                req = reflection_pb2.ServerReflectionRequest(list_services="")
                await collect(reflect.ServerReflectionInfo(iter([req])))
            codes.append((e.value.code(), e.value.details()))
            ok = await c.stub.ModelInfo(
                pb.ModelInfoRequest(), metadata=(("authorization", "Bearer k-two"),)
            )
            health = await health_pb2_grpc.HealthStub(c.channel).Check(
                health_pb2.HealthCheckRequest()
            )
            return codes, ok, health

    codes, ok, health = run(main())
    assert all(code == grpc.StatusCode.UNAUTHENTICATED for code, _ in codes)
    assert codes[0][1].startswith("missing API key") and codes[1][1] == "invalid API key"
    assert ok.architecture == "llama"
    assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no key


def test_server_faults_are_internal_never_unknown(loaded):
    def broken():
        raise RuntimeError("boom")

    async def main():
        server = await start_grpc(broken, host="127.0.0.1", port=0)
        try:
            async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = pb_grpc.InferenceStub(channel)
                errs = []
                for call in (
                    lambda: stub.ModelInfo(pb.ModelInfoRequest()),
                    lambda: collect(stub.Generate(pb.GenerateRequest(text="x"))),
                ):
                    with pytest.raises(aio.AioRpcError) as e:
                        await call()
                    errs.append((e.value.code(), e.value.details()))
                health = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest()
                )
                return errs, health.status
        finally:
            await server.stop(None)

    errs, status = run(main())
    assert errs == [(grpc.StatusCode.INTERNAL, "internal error: RuntimeError: boom")] * 2
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
