"""gRPC Embed over the shared engine: a batch of inputs, the same vectors as a direct computation."""

import grpc
import numpy as np
import pytest
from grpc import aio

from gguf_serve.v1 import inference_pb2 as pb
from gguf_serve.v1 import sampling_pb2 as spb
from tests.grpc_harness import new_engine, run, serve, wait_idle
from tests.test_embeddings import direct

TEXTS = ["Hello", "The quick brown fox jumps over the lazy dog.", "Paged attention " * 30]


def embedding_server(loaded, pooling="mean", **kw):
    return serve(loaded, holder={"ae": new_engine(loaded, embeddings=True, pooling=pooling)}, **kw)


async def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(aio.AioRpcError) as e:
        await call
    return e.value.code(), e.value.details()


def test_embed_a_batch_equals_a_direct_computation(loaded):
    tok = loaded.tokenizer
    ids = [tok.encode(t, add_special=True, parse_special=True) for t in TEXTS]

    async def main():
        async with embedding_server(loaded) as c:
            inputs = [pb.EmbedInput(text=t) for t in TEXTS[:2]]
            inputs.append(pb.EmbedInput(token_ids=spb.TokenIds(ids=ids[2])))
            unit = await c.stub.Embed(pb.EmbedRequest(inputs=inputs))
            raw = await c.stub.Embed(pb.EmbedRequest(inputs=inputs, normalize=False))
            return unit, raw, await wait_idle(c.ae)

    unit, raw, (busy, free, total) = run(main())
    assert len(unit.embeddings) == 3 and unit.usage.prompt_tokens == sum(map(len, ids))
    for u, r, p in zip(unit.embeddings, raw.embeddings, ids):
        mean = direct(loaded, p).mean(0).double().numpy()
        np.testing.assert_allclose(r.values, mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(u.values, mean / np.linalg.norm(mean), rtol=1e-4, atol=1e-5)
    assert (busy, free) == (0, total)  # every block released


def test_embed_errors(loaded):
    async def main():
        out = {}
        async with embedding_server(loaded, max_message_bytes=3 * (4 * 32 + 16)) as c:
            out["empty"] = await code_of(c.stub.Embed(pb.EmbedRequest()))
            out["empty text"] = await code_of(
                c.stub.Embed(pb.EmbedRequest(inputs=[pb.EmbedInput(text="")]))
            )
            bad = pb.EmbedInput(token_ids=spb.TokenIds(ids=[10**7]))
            out["range"] = await code_of(c.stub.Embed(pb.EmbedRequest(inputs=[bad])))
            many = [pb.EmbedInput(text="x")] * 3
            out["too many"] = await code_of(c.stub.Embed(pb.EmbedRequest(inputs=many)))
        async with embedding_server(loaded, pooling="none") as c:
            req = pb.EmbedRequest(inputs=[pb.EmbedInput(text="x")])
            out["none"] = await code_of(c.stub.Embed(req))
        return out

    assert loaded.config.hidden == 32  # the limit above holds 2 vectors of this model
    out = run(main())
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert out["empty"] == (invalid, "inputs: must be a non-empty list")
    assert out["empty text"] == (invalid, "the prompt is empty")
    assert out["range"] == (invalid, "token id 10000000 is out of range [0, 128256)")
    assert out["too many"] == (invalid, "inputs: at most 2 per call (the message size limit), got 3")
    assert out["none"][0] == grpc.StatusCode.FAILED_PRECONDITION and "--pooling" in out["none"][1]
