"""POST /slots/{id}?action=save|restore|erase over HTTP and SaveSlot/RestoreSlot/EraseSlot over gRPC."""

from urllib.parse import quote

import grpc
import httpx
import pytest
from grpc import aio

from gguf_serve.v1 import inference_pb2 as pb
from http_api.cli import ServerSettings
from http_api.testing import LiveServer
from tests.grpc_harness import collect, greedy, new_engine, run, serve
from tests.test_slot_store import HOSTILE

PROMPT = "A slot remembers its context across restarts. " * 6
GREEDY = {"n_predict": 8, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def save_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("slots")


def settings(path, save_dir) -> ServerSettings:
    return ServerSettings(
        model=str(path), n_threads=1, n_ctx=512, n_parallel=2, slot_save_path=str(save_dir)
    )


@pytest.fixture(scope="module")
def client(llama3_tiny_path, save_dir):
    with LiveServer(settings(llama3_tiny_path, save_dir)) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            yield c


def test_save_erase_restore_then_the_prompt_is_cached(client, save_dir):
    c = client
    first = c.post("/completion", json={"prompt": PROMPT, "id_slot": 1, **GREEDY}).json()
    assert first["id_slot"] == 1 and first["timings"]["cache_n"] == 0
    saved = c.post("/slots/1?action=save", json={"filename": "one.bin"}).json()
    n_ctx = first["tokens_evaluated"] + len(first["tokens"]) - 1
    assert saved["id_slot"] == 1 and saved["filename"] == "one.bin"
    assert saved["n_saved"] == n_ctx and saved["n_written"] == (save_dir / "one.bin").stat().st_size
    assert saved["timings"]["save_ms"] >= 0
    erased = c.post("/slots/1?action=erase").json()
    assert erased == {"id_slot": 1, "n_erased": n_ctx}
    again = c.post("/completion", json={"prompt": PROMPT, **GREEDY}).json()
    assert again["timings"]["cache_n"] == 0  # erased: nothing cached any more
    c.post("/slots/0?action=erase")
    c.post("/slots/1?action=erase")
    restored = c.post("/slots/0?action=restore", json={"filename": "one.bin"}).json()
    assert restored["id_slot"] == 0 and restored["n_restored"] == n_ctx
    assert restored["n_read"] == saved["n_written"] and "restore_ms" in restored["timings"]
    last = c.post("/completion", json={"prompt": PROMPT, **GREEDY}).json()
    bs = 16
    assert last["timings"]["cache_n"] == (first["tokens_evaluated"] - 1) // bs * bs > 0
    assert last["tokens"] == first["tokens"] and last["content"] == first["content"]


def test_bad_slot_requests(client, save_dir):
    c = client
    for name in HOSTILE:
        for action in ("save", "restore"):
            r = c.post(f"/slots/0?action={action}", json={"filename": name})
            assert r.status_code == 400 and r.json()["error"]["message"] == "Invalid filename"
    assert c.post("/slots/0?action=save", json={}).status_code == 400  # no filename
    for path, message in [
        ("/slots/abc?action=save", "Invalid slot ID"),
        ("/slots/1_0?action=save", "Invalid slot ID"),
        ("/slots/7?action=save", "Invalid slot ID"),
        ("/slots/-1?action=erase", "Invalid slot ID"),
        ("/slots/0?action=dance", "Invalid action"),
        ("/slots/0", "Invalid action"),
    ]:
        r = c.post(path, json={"filename": "a.bin"})
        assert r.status_code == 400 and message in r.json()["error"]["message"], (path, r.text)
    r = c.post("/slots/0?action=restore", json={"filename": "never-saved.bin"})
    assert r.status_code == 400
    # a path in the URL itself never reaches the route as a slot id
    assert c.post("/slots/" + quote("../0", safe="") + "?action=erase").status_code in (
        400,
        404,
    )
    assert c.get("/health").status_code == 200
    outside = {p.name for p in save_dir.parent.iterdir()}
    assert not any(n in outside for n in ("x", "passwd", "y", "b", "hidden"))


def test_grpc_slot_calls(loaded, tmp_path):
    async def main():
        holder = {"ae": new_engine(loaded, n_parallel=2, slot_save_path=str(tmp_path))}
        async with serve(loaded, holder=holder) as c:
            req = pb.GenerateRequest(text=PROMPT, params=greedy(8, ignore_eos=True), id_slot=1)
            first = await collect(c.stub.Generate(req))
            saved = await c.stub.SaveSlot(pb.SaveSlotRequest(id_slot=1, filename="g.bin"))
            erased = await c.stub.EraseSlot(pb.EraseSlotRequest(id_slot=1))
            restored = await c.stub.RestoreSlot(pb.RestoreSlotRequest(id_slot=0, filename="g.bin"))
            again = await c.stub.Complete(
                pb.GenerateRequest(text=PROMPT, params=greedy(8, ignore_eos=True))
            )
            with pytest.raises(aio.AioRpcError) as e:
                await c.stub.SaveSlot(pb.SaveSlotRequest(id_slot=0, filename="../evil"))
            return first, saved, erased, restored, again, e.value

    first, saved, erased, restored, again, err = run(main())
    tokens = [t for m in first for t in m.token_ids]
    assert saved.n_saved == erased.n_erased == restored.n_restored > 0
    assert saved.filename == restored.filename == "g.bin"
    assert saved.n_written == restored.n_read == (tmp_path / "g.bin").stat().st_size
    assert saved.save_ms >= 0 and restored.restore_ms >= 0
    assert list(again.token_ids) == tokens and again.usage.cached_tokens > 0
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details() == "Invalid filename"
    assert [p.name for p in tmp_path.iterdir()] == ["g.bin"]
