"""Slot save / restore / erase in the engine: tokens and KV round-trip, restored prompts hit the cache."""

import pytest
import torch

from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.errors import InvalidRequestError, NotSupportedError
from runtime.sampling_params import SamplingParams
from runtime.slot_store import check_filename, erase_slot, restore_slot, save_slot

GREEDY = SamplingParams(temperature=0.0, n_predict=10, ignore_eos=True)
HOSTILE = [
    "", ".", "..", "../x", "a/b", "/etc/passwd", "a\\b", "..\\x", "x/../../y", ".hidden",
    "a..b", "trailing.", " lead", "trail ", "nul\x00", "tab\tx", "c:x", "a" * 256, 5, None,
]  # fmt: skip


def engine(loaded, tmp_path, **kw) -> Engine:
    cfg = dict(model_path=str(loaded.path), n_ctx=512, n_parallel=2, slot_save_path=str(tmp_path))
    cfg.update(kw)
    return Engine(EngineConfig(**cfg), loaded=loaded)


def run(e: Engine, prompt, id_slot=-1):
    rid = e.add_request(prompt, GREEDY, id_slot=id_slot)
    tokens, cached = [], None
    while e.has_unfinished():
        for o in e.step():
            if o.request_id == rid:
                tokens += o.new_token_ids
                cached = o.num_cached_tokens
    return tokens, cached


@pytest.fixture(scope="module")
def prompt(loaded):
    return loaded.tokenizer.encode("A slot remembers its context across restarts. " * 6)


def test_save_restore_round_trips_tokens_and_kv(loaded, tmp_path, prompt):
    a = engine(loaded, tmp_path)
    out_a, cached = run(a, prompt, id_slot=1)
    assert cached == 0
    saved = save_slot(a, 1, "s1.bin")
    n_ctx = len(prompt) + len(out_a) - 1  # the last sampled token was never fed back
    assert (saved.id_slot, saved.filename, saved.n_tokens) == (1, "s1.bin", n_ctx)
    assert saved.n_bytes == (tmp_path / "s1.bin").stat().st_size and saved.ms >= 0

    b = engine(loaded, tmp_path)  # a fresh server: an empty cache
    restored = restore_slot(b, 0, "s1.bin")
    assert restored.n_tokens == n_ctx and restored.n_bytes == saved.n_bytes
    bs = b.cfg.block_size
    hashes = b.blocks.hashes(a.scheduler.slot_context(1), [])
    blocks_a, blocks_b = a.blocks.match_prefix(hashes), b.blocks.match_prefix(hashes)
    assert len(blocks_b) == n_ctx // bs and b.num_free_blocks == b.blocks.num_blocks
    for ka, kb in zip(
        a.runner.cache.read_blocks(blocks_a)[0], b.runner.cache.read_blocks(blocks_b)[0]
    ):
        assert torch.equal(ka, kb)  # the K/V bytes came back exactly
    out_b, cached = run(b, prompt)
    assert out_b == out_a
    assert cached == (len(prompt) - 1) // bs * bs  # every full prompt block came from the file
    assert b.stats().prefix_cache_hit_tokens == cached
    assert (
        b.scheduler.slot_context(0)
        == a.scheduler.slot_context(1)[: len(b.scheduler.slot_context(0))]
    )


def test_erase_forgets_the_slot_and_its_cached_blocks(loaded, tmp_path, prompt):
    e = engine(loaded, tmp_path)
    out, _ = run(e, prompt, id_slot=0)
    assert erase_slot(e, 0) == len(prompt) + len(out) - 1
    assert erase_slot(e, 0) == 0  # nothing left
    again, cached = run(e, prompt, id_slot=0)
    assert cached == 0 and again == out
    e.add_request(prompt, GREEDY, id_slot=1)
    e.step()
    with pytest.raises(InvalidRequestError, match="slot 1 is processing"):
        erase_slot(e, 1)


def test_hostile_file_names_are_refused_and_nothing_is_written_outside(loaded, tmp_path):
    inside = tmp_path / "slots"
    e = engine(loaded, inside)
    for name in HOSTILE:
        with pytest.raises(InvalidRequestError, match="Invalid filename"):
            check_filename(name)
        with pytest.raises(InvalidRequestError, match="Invalid filename"):
            save_slot(e, 0, name)
        with pytest.raises(InvalidRequestError, match="Invalid filename"):
            restore_slot(e, 0, name)
    assert sorted(p.name for p in tmp_path.rglob("*")) == []  # not even the directory was made
    save_slot(e, 0, "ok-name_1.bin")
    assert [p.name for p in inside.iterdir()] == ["ok-name_1.bin"]


def test_errors(loaded, tmp_path, prompt):
    off = engine(loaded, tmp_path, slot_save_path=None)
    with pytest.raises(NotSupportedError, match="--slot-save-path"):
        save_slot(off, 0, "a.bin")
    e = engine(loaded, tmp_path)
    with pytest.raises(InvalidRequestError, match="Invalid slot ID"):
        save_slot(e, 2, "a.bin")
    with pytest.raises(InvalidRequestError, match="no file 'missing.bin'"):
        restore_slot(e, 0, "missing.bin")
    (tmp_path / "junk.bin").write_bytes(b"not a slot")
    with pytest.raises(InvalidRequestError, match="not a slot file"):
        restore_slot(e, 0, "junk.bin")
    run(e, prompt, id_slot=0)
    save_slot(e, 0, "a.bin")
    other = engine(loaded, tmp_path, block_size=32)
    with pytest.raises(InvalidRequestError, match="another model"):
        restore_slot(other, 0, "a.bin")
    # the right signature over the wrong contents: refused before anything is written
    good = torch.load(tmp_path / "a.bin", weights_only=True)
    assert good["n_kv_blocks"] > 0
    for name, change in [
        ("dims.bin", lambda s: s["k"].__setitem__(0, s["k"][0][..., 1:])),
        ("layers.bin", lambda s: s["v"].pop()),
        ("count.bin", lambda s: s.__setitem__("n_kv_blocks", s["n_kv_blocks"] + 1)),
        ("tokens.bin", lambda s: s.__setitem__("tokens", s["tokens"][:1])),
        ("ints.bin", lambda s: s["k"].__setitem__(0, s["k"][0].long())),
    ]:
        bad = {**good, "k": list(good["k"]), "v": list(good["v"])}
        change(bad)
        torch.save(bad, tmp_path / name)
        free = e.num_free_blocks
        with pytest.raises(InvalidRequestError, match="does not hold this model's KV blocks"):
            restore_slot(e, 0, name)
        assert e.num_free_blocks == free
