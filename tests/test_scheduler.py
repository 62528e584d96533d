"""Token-level scheduling: budgets, slots, chunked prefill, preemption and freeing, without a model."""

import random
from collections import Counter

from runtime.block_manager import BlockManager
from runtime.request import Request, Status
from runtime.sampling_params import SamplingParams
from runtime.scheduler import SampledToken, Scheduler

EOS = 99


def make(n_blocks=16, bs=4, max_running=2, budget=8, max_len=64):
    bm = BlockManager(n_blocks, bs)
    return bm, Scheduler(bm, max_running, budget, max_len, frozenset({EOS}))


def req(rid, n_prompt, n_predict=3):
    return Request(rid, list(range(1, n_prompt + 1)), SamplingParams(temperature=0, n_predict=n_predict))


def step(s, tokens=None):
    out = s.schedule()
    sampled = [SampledToken(tokens.get(q.request.request_id, 7) if tokens else 7) if q.sample else None for q in out.seqs]
    return out, s.update(out, sampled)


def test_chunked_prefill_under_budget_then_decode():
    bm, s = make(budget=8)
    r = req("a", 10, n_predict=2)
    s.add(r)
    out, res = step(s)
    assert [(q.request.request_id, q.num_new, q.sample) for q in out.seqs] == [("a", 8, False)]
    assert res == [] and r.block_ids == [0, 1]
    out, res = step(s)
    assert [(q.num_new, q.sample) for q in out.seqs] == [(2, True)]
    assert r.block_ids == [0, 1, 2] and res[0].new_token_ids == (7,)
    out, res = step(s)
    assert [(q.num_new, q.sample) for q in out.seqs] == [(1, True)]
    assert res[0].finished and res[0].finish_reason == "length"
    assert bm.num_free == 16 and r.status is Status.FINISHED


def test_slots_limit_running_and_eos_stops():
    bm, s = make(max_running=2, budget=100)
    for rid in "abc":
        s.add(req(rid, 3, n_predict=5))
    out, _ = step(s)
    assert [q.request.request_id for q in out.seqs] == ["a", "b"]
    assert [r.request_id for r in s.waiting] == ["c"]
    out, res = step(s, {"a": EOS})
    fin = {o.request_id: o.finish_reason for o in res if o.finished}
    assert fin == {"a": "stop"}
    out, _ = step(s)
    assert [q.request.request_id for q in out.seqs] == ["b", "c"]


def test_preemption_recomputes_and_frees():
    bm, s = make(n_blocks=3, bs=4, max_running=2, budget=100)
    a, b = req("a", 4, n_predict=6), req("b", 4, n_predict=6)
    s.add(a)
    s.add(b)
    step(s)  # both prefilled: one block each, one block left
    assert a.block_ids == [0] and b.block_ids == [1]
    out, _ = step(s)  # both need a 2nd block: only one free -> b is preempted
    assert out.preempted == ("b",)
    assert [q.request.request_id for q in out.seqs] == ["a"]
    assert b.status is Status.WAITING and b.num_computed_tokens == 0 and b.block_ids == []
    assert a.block_ids == [0, 2]


def test_abort_frees_blocks():
    bm, s = make()
    r = req("a", 9)
    s.add(r)
    step(s)
    assert bm.num_free < 16
    assert s.abort("a") is r and r.finish_reason == "abort"
    assert bm.num_free == 16 and not s.has_unfinished()
    assert s.abort("missing") is None


def test_random_operations_end_with_every_block_free():
    rng = random.Random(0)
    bm, s = make(n_blocks=12, bs=4, max_running=3, budget=10, max_len=40)
    live = []
    for i in range(1000):
        op = rng.random()
        if op < 0.3:
            r = req(f"r{i}", rng.randint(1, 20), n_predict=rng.randint(1, 10))
            s.add(r)
            live.append(r.request_id)
        elif op < 0.4 and live:
            s.abort(live.pop(rng.randrange(len(live))))
        else:
            _, res = step(s, {rid: EOS for rid in live if rng.random() < 0.05})
            done = {o.request_id for o in res if o.finished}
            live = [x for x in live if x not in done]
        _check_refs(bm, s)
    for rid in list(live):
        s.abort(rid)
    assert bm.num_free == 12 and not s.has_unfinished()


def _check_refs(bm, s):
    """Every block's ref count is the number of running tables holding it; the rest are free."""
    held = Counter(b for r in s.running for b in r.block_ids)
    assert all(bm.ref_count(b) == held.get(b, 0) for b in range(bm.num_blocks))
    assert len(held) + bm.num_free == bm.num_blocks


def test_prefix_cache_shares_full_blocks_and_recomputes_the_last_token():
    bm, s = make(n_blocks=16, bs=4, max_running=4, budget=100)
    a = Request("a", list(range(1, 11)), SamplingParams(temperature=0, n_predict=1))
    s.add(a)
    step(s)  # 10 prompt tokens + 1 sampled: blocks 0, 1 full and registered, 2 partial
    assert a.finish_reason == "length" and bm.num_cached == 2 and bm.num_free == 16
    # The finished request's blocks went back tail first: free list is 3..15, 2, 1, 0.
    b = Request("b", list(range(1, 9)) + [50, 51, 52], SamplingParams(temperature=0, n_predict=5))
    s.add(b)
    out, _ = step(s)
    assert b.num_cached_tokens == 8 and b.block_ids == [0, 1, 3]
    assert [(q.num_new, q.sample) for q in out.seqs] == [(3, True)]
    assert [bm.ref_count(i) for i in (0, 1, 3)] == [1, 1, 1]
    # An identical 8-token prompt (two full blocks) recomputes its last token: one hit block.
    c = Request("c", list(range(1, 9)), SamplingParams(temperature=0, n_predict=2))
    s.add(c)
    out, _ = step(s)
    assert c.num_cached_tokens == 4 and c.block_ids[0] == 0 and bm.ref_count(0) == 2
    assert [(q.request.request_id, q.num_new) for q in out.seqs] == [("b", 1), ("c", 4)]
    _check_refs(bm, s)
    for rid in ("b", "c"):
        s.abort(rid)
    assert bm.num_free == 16


def test_prefix_cache_evicts_least_recently_freed_first():
    bm, s = make(n_blocks=4, bs=4, max_running=1, budget=100)
    s.add(Request("a", list(range(1, 9)), SamplingParams(temperature=0, n_predict=1)))
    step(s)  # 8 prompt tokens in blocks 0, 1, both registered; then freed: free list 2, 3, 1, 0
    assert bm.num_cached == 2
    # A different prompt needing 3 blocks takes 2, 3 (never used), then 1: block 1 (the
    # tail of a's prefix) is evicted before block 0, its parent.
    s.add(Request("x", [70 + i for i in range(10)], SamplingParams(temperature=0, n_predict=1)))
    step(s)
    assert bm.num_cached == 3  # x's two full blocks + a's first block (0) survive
    s.add(Request("a2", list(range(1, 9)) + [9], SamplingParams(temperature=0, n_predict=1)))
    out, _ = step(s)
    assert out.seqs[0].request.num_cached_tokens == 4 and out.seqs[0].num_new == 5


def test_n_predict_zero_evaluates_the_prompt_and_generates_nothing():
    bm, s = make()
    r = req("a", 5, n_predict=0)
    s.add(r)
    _, res = step(s)
    assert [(o.new_token_ids, o.finished, o.finish_reason) for o in res] == [((), True, "length")]
    assert r.output_token_ids == [] and bm.num_free == 16 and bm.num_cached == 1


class _Params:
    """SamplingParams stand-in carrying the context-shift fields."""

    def __init__(self, n_predict, n_keep=None, n_discard=0):
        self.n_predict, self.n_keep, self.n_discard = n_predict, n_keep, n_discard
        self.ignore_eos = True


def test_context_shift_keeps_n_keep_drops_half_and_moves_the_tail():
    bm = BlockManager(16, 4)
    s = Scheduler(bm, 2, 100, 16, frozenset({EOS}), context_shift=True, n_keep_bos=1)
    r = Request("a", list(range(1, 15)), _Params(n_predict=10, n_keep=2))
    s.add(r)
    step(s)  # 14 prompt tokens computed in blocks 0-3, one sampled: 15 tokens
    step(s)  # 15 computed, 16 tokens: the context (16) is full
    assert r.needs_shift and r.block_ids == [0, 1, 2, 3]
    out, _ = step(s)
    # n_keep = 2 + BOS = 3; n_past 15 -> n_discard (15-3)//2 = 6: tokens 4-9 dropped, then
    # this step decodes one more (7).
    assert r.token_ids == [1, 2, 3, 10, 11, 12, 13, 14, 7, 7, 7] and r.num_shifted_tokens == 6
    # Block 0 holds kept tokens 0-2 and moved ones: it is rewritten into a fresh block too.
    copy, slide = out.kv_moves
    assert r.block_ids == [4, 5, 6]  # old 0-3 freed after the copy is scheduled
    assert (copy.src, copy.dst, copy.delta) == ((0, 1, 2), (16, 17, 18), 0)
    assert slide.src == (9, 10, 11, 12, 13, 14) and slide.dst == (19, 20, 21, 22, 23, 24)
    assert slide.delta == -6
    assert [(q.num_new, q.sample) for q in out.seqs] == [(1, True)]
    assert r.num_computed_tokens == 10


def test_context_shift_off_or_impossible_stops_with_length():
    bm = BlockManager(16, 4)
    s = Scheduler(bm, 2, 100, 8, frozenset({EOS}), context_shift=False)
    r = Request("a", list(range(1, 7)), _Params(n_predict=10))
    s.add(r)
    step(s)
    _, res = step(s)
    assert res[-1].finish_reason == "length" and bm.num_free == 16
    s2 = Scheduler(bm, 2, 100, 8, frozenset({EOS}), context_shift=True)
    r2 = Request("b", list(range(1, 7)), _Params(n_predict=10, n_keep=-1))  # keep the whole prompt
    s2.add(r2)
    step(s2)
    _, res = step(s2)
    assert res[-1].finish_reason == "length"


def test_context_shift_without_room_recomputes():
    bm = BlockManager(5, 4)  # 4 blocks in use at the shift, 1 free: too few for the copy
    s = Scheduler(bm, 1, 100, 16, frozenset({EOS}), context_shift=True)
    r = Request("a", list(range(1, 15)), _Params(n_predict=10))
    s.add(r)
    step(s)
    step(s)
    out, _ = step(s)
    assert out.kv_moves == () and r.num_shifted_tokens == 7
    assert [(q.num_new, q.sample) for q in out.seqs] == [(9, True)]  # the shortened context, recomputed
    assert len(r.block_ids) == 3


def test_slots_are_the_lowest_idle_ids_and_id_slot_waits_for_its_own():
    bm, s = make(max_running=3, budget=100)
    a, b = req("a", 2, n_predict=5), req("b", 2, n_predict=1)
    s.add(a)
    s.add(b)
    step(s)  # b finishes at once, freeing slot 1
    assert a.slot_id == 0 and b.slot_id == -1 and s.free_slots == {1, 2}
    c = Request("c", [1, 2], SamplingParams(temperature=0, n_predict=2), id_slot=0)  # a holds slot 0
    d = req("d", 2, n_predict=1)
    s.add(c)
    s.add(d)
    out, res = step(s)
    assert [q.request.request_id for q in out.seqs] == ["a", "d"] and d.slot_id == -1
    assert [o.slot_id for o in res if o.request_id == "d"] == [1]
    c_slots = []
    while s.has_unfinished():
        assert c.status is Status.WAITING or a.status is Status.FINISHED
        _, res = step(s)
        c_slots += [o.slot_id for o in res if o.request_id == "c"]
    assert c_slots == [0, 0] and s.free_slots == {0, 1, 2}
