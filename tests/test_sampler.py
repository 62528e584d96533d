"""The sampler chain against llama.cpp's definitions, on hand-made logits, with small independent references."""

import math
import statistics
from dataclasses import replace

import pytest
import torch

from runtime.sampler import SampleRow, SamplerVocab, apply_chain, new_sampler_state, sample
from runtime.samplers import filters as F
from runtime.samplers.dry import RepeatTracker, build_breakers, dry_penalties, repeat_lengths
from runtime.samplers.filters import Cands
from runtime.sampling_params import SamplingParams

TEXTS = ["<eos>", "a", "b", "c", "\n", "d", "e:", "f", "g", "h"]
VOCAB = SamplerVocab(len(TEXTS), TEXTS.__getitem__, eog_ids=[0])
LOGITS = [1.0, 3.0, 2.5, 2.0, 1.5, 0.5, 0.0, -0.5, -1.0, -2.0]


def only(**kw):
    """Params with every sampler off except the given ones (temperature 1)."""
    return SamplingParams(**{"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, **kw})


def chain(params, logits=LOGITS, history=(), xtc_u=0.0):
    """Row 0's final distribution after the chain: token -> probability (removed tokens absent)."""
    st = new_sampler_state(params, list(history), VOCAB)
    u = torch.tensor([xtc_u], dtype=torch.float64)
    c = apply_chain(Cands(torch.tensor([logits])), st.plan, [st], u)
    probs = c.logits[0].softmax(0)
    return {int(t): float(q) for t, q in zip(c.token_ids()[0], probs) if q > 0}


def softmax(logits, keep=None, t=1.0):
    w = {i: math.exp(logits[i] / t) for i in (range(len(logits)) if keep is None else keep)}
    return {i: v / sum(w.values()) for i, v in w.items()}


def by_prob(logits):
    return sorted(range(len(logits)), key=lambda i: -logits[i])


def assert_dist(got, want):
    assert set(got) == set(want)
    for t in want:
        assert got[t] == pytest.approx(want[t], rel=1e-5, abs=1e-7)


def test_top_k_keeps_the_k_best_per_row():
    assert_dist(chain(only(top_k=3)), softmax(LOGITS, [1, 2, 3]))
    c = F.top_k(Cands(torch.tensor([LOGITS, LOGITS[::-1]])), [2, 4])
    kept = [{int(t) for t, v in zip(c.ids[r], c.logits[r]) if v > -math.inf} for r in range(2)]
    assert kept == [{1, 2}, {8, 7, 6, 5}]


@pytest.mark.parametrize("v", [262144, 128256 + 77, 1000])  # chunked, chunked with a ragged tail, plain
def test_topk_and_argmax_helpers_match_torch(v):
    x = torch.randn(3, v, generator=torch.Generator().manual_seed(v))
    x[1, -1] = 100.0  # the maximum in the tail
    x[2, 5] = x[2, 700] = 50.0  # a tie: the first one wins
    vals, ids = F.topk(x, 40)
    want = x.topk(40, dim=1)
    assert torch.equal(vals, want.values) and torch.equal(x.gather(1, ids), vals)
    assert F.argmax(x).tolist() == [int(x[0].argmax()), v - 1, 5]


def ref_top_p(logits, p, min_keep=0):
    probs, cum = softmax(logits), 0.0
    order = by_prob(logits)
    for i, t in enumerate(order):
        cum += probs[t]
        if cum >= p and i + 1 >= min_keep:
            return order[: i + 1]
    return order


@pytest.mark.parametrize("p,min_keep", [(0.5, 0), (0.8, 0), (0.3, 4), (0.0, 0)])
def test_top_p_with_min_keep(p, min_keep):
    assert_dist(chain(only(top_p=p, min_keep=min_keep)), softmax(LOGITS, ref_top_p(LOGITS, p, min_keep)))


@pytest.mark.parametrize("scale", [8.0, 0.01])  # a peaked row (nucleus in the head) and a flat one (full sort)
def test_top_p_on_a_large_vocabulary_head_or_full_sort(scale):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 3000, generator=g) * scale).tolist()
    c = F.top_p(Cands(torch.tensor(logits)), [0.9, 0.6], [0, 0])
    for r, p in enumerate([0.9, 0.6]):
        kept = {int(t) for t, v in zip(c.ids[r], c.logits[r]) if v > -math.inf}
        assert kept == set(ref_top_p(logits[r], p))


@pytest.mark.parametrize("p,min_keep", [(0.3, 0), (0.1, 0), (0.9, 3)])
def test_min_p_relative_to_the_top_token(p, min_keep):
    probs = softmax(LOGITS)
    order = by_prob(LOGITS)
    keep = [t for i, t in enumerate(order) if probs[t] >= p * probs[order[0]] or i < min_keep]
    assert_dist(chain(only(min_p=p, min_keep=min_keep)), softmax(LOGITS, keep))


def ref_tail_free(logits, z):
    order = by_prob(logits)
    probs = softmax(logits)
    p = [probs[t] for t in order]
    d1 = [p[i] - p[i + 1] for i in range(len(p) - 1)]
    d2 = [abs(d1[i] - d1[i + 1]) for i in range(len(d1) - 1)]
    d2 = [v / sum(d2) for v in d2]
    cum = 0.0
    for i, v in enumerate(d2):
        cum += v
        if cum > z:
            return order[: max(i, 1)]
    return order


def test_tail_free_cuts_at_the_second_derivative_mass():
    logits = [5.0, 4.8, 4.5, 2.0, 1.9, 1.8, 0.5, 0.4, -1.0, -3.0]
    want = ref_tail_free(logits, 0.6)
    assert 1 < len(want) < len(logits)
    assert_dist(chain(only(tfs_z=0.6), logits), softmax(logits, want))


def test_typical_keeps_tokens_closest_to_the_entropy():
    probs = softmax(LOGITS)
    entropy = -sum(q * math.log(q) for q in probs.values())
    order = sorted(probs, key=lambda t: abs(-math.log(probs[t]) - entropy))
    cum, keep = 0.0, []
    for t in order:
        keep.append(t)
        cum += probs[t]
        if cum > 0.3:
            break
    assert 1 not in keep  # the top token is not typical here: typical_p can move the argmax
    assert_dist(chain(only(typical_p=0.3)), softmax(LOGITS, keep))


def test_temperature_and_greedy():
    assert_dist(chain(only(temperature=0.5)), softmax(LOGITS, t=0.5))
    assert chain(only(temperature=0.0)) == {1: 1.0}
    assert chain(only(temperature=-1.0, top_k=3)) == {1: 1.0}


def test_dynatemp_maps_normalized_entropy_to_the_range():
    keep = [1, 2, 3, 4]
    probs = softmax(LOGITS, keep)
    norm = -sum(q * math.log(q) for q in probs.values()) / math.log(4)
    t = 0.5 + (1.5 - 0.5) * norm**2.0
    got = chain(only(top_k=4, temperature=1.0, dynatemp_range=0.5, dynatemp_exponent=2.0))
    assert_dist(got, softmax(LOGITS, keep, t=t))


def test_top_n_sigma_keeps_logits_near_the_top():
    floor = max(LOGITS) - 1.0 * statistics.pstdev(LOGITS)
    assert_dist(chain(only(top_n_sigma=1.0)), softmax(LOGITS, [i for i, v in enumerate(LOGITS) if v >= floor]))


def chain_logits(params, history=(), outputs=()):
    st = new_sampler_state(params, list(history), VOCAB)
    st.sync(list(outputs))
    c = apply_chain(Cands(torch.tensor([LOGITS])), st.plan, [st], torch.zeros(1, dtype=torch.float64))
    return c.logits[0].tolist()


def test_repetition_presence_frequency_penalties_over_repeat_last_n():
    p = only(repeat_penalty=2.0, repeat_last_n=3, presence_penalty=0.5, frequency_penalty=0.25)
    got = chain_logits(p, history=[5, 1], outputs=[8, 1])  # window [1, 8, 1]: 5 has left it
    want = list(LOGITS)
    want[1] = 3.0 / 2 - 2 * 0.25 - 0.5
    want[8] = -1.0 * 2 - 0.25 - 0.5  # a negative logit is multiplied
    assert got == pytest.approx(want)
    whole = chain_logits(replace(p, repeat_last_n=-1), history=[5, 1], outputs=[8, 1])
    assert whole[5] == pytest.approx(0.5 / 2 - 0.25 - 0.5)
    assert "penalties" not in new_sampler_state(only(repeat_penalty=2.0, repeat_last_n=0), [1], VOCAB).plan


def test_penalize_nl_and_penalty_prompt_tokens():
    on = chain_logits(only(repeat_penalty=2.0), history=[4, 1])
    off = chain_logits(only(repeat_penalty=2.0, penalize_nl=False), history=[4, 1])
    assert on[4] == pytest.approx(0.75) and off[4] == pytest.approx(1.5)  # "\n" is token 4
    assert on[1] == off[1] == pytest.approx(1.5)
    given = chain_logits(only(repeat_penalty=2.0, penalty_prompt_tokens=(2,)), history=[4, 1])
    assert given[2] == pytest.approx(1.25) and given[1] == pytest.approx(3.0) and given[4] == pytest.approx(1.5)


def greedy_row(params, history=(), outputs=(), processors=()):
    return SampleRow(new_sampler_state(params, list(history), VOCAB), list(outputs), list(processors))


def test_logit_bias_bans_and_boosts():
    rows = [
        greedy_row(SamplingParams(temperature=0, logit_bias=((1, -math.inf),))),
        greedy_row(SamplingParams(temperature=0, logit_bias=((9, 3.0), (9, 3.0)))),  # duplicates add up
        greedy_row(SamplingParams(temperature=0)),
    ]
    ids, _ = sample(torch.tensor([LOGITS] * 3), rows)
    assert ids == [2, 9, 1]


def test_owned_logits_are_biased_in_place_unless_log_probs_need_them():
    def rows(n_probs=0):
        return [greedy_row(SamplingParams(temperature=0, n_probs=n_probs, logit_bias=((1, -math.inf),)))] * 2

    shared = torch.tensor([LOGITS] * 2)
    assert sample(shared, rows())[0] == [2, 2]
    assert torch.equal(shared, torch.tensor([LOGITS] * 2))  # not owned: untouched
    owned = torch.tensor([LOGITS] * 2)
    assert sample(owned, rows(), owned=True)[0] == [2, 2]
    assert owned[0, 1] == -math.inf  # the runner's tensor: no 8 MB copy per step
    kept = torch.tensor([LOGITS] * 2)
    ids, lps = sample(kept, rows(n_probs=2), owned=True)
    assert ids == [2, 2] and torch.equal(kept, torch.tensor([LOGITS] * 2))
    assert lps[0] is not None and lps[0].top[0][0] == 1  # raw distribution: the banned token still tops it


def test_ignore_eos_bans_end_of_generation_tokens():
    logits = torch.tensor([[9.0] + LOGITS[1:]] * 2)
    rows = [greedy_row(SamplingParams(temperature=0)), greedy_row(SamplingParams(temperature=0, ignore_eos=True))]
    assert sample(logits, rows)[0] == [0, 1]
    seeded = [SampleRow(new_sampler_state(SamplingParams(seed=s, ignore_eos=True, top_k=2), [], VOCAB)) for s in range(20)]
    assert 0 not in sample(torch.tensor([[9.0] + LOGITS[1:]] * 20), seeded)[0]


def test_logits_processor_runs_first_and_sees_the_output():
    seen = []

    def only_seven(out, x):
        seen.append(list(out))
        y = torch.full_like(x, -math.inf)
        y[7] = x[7]
        return y

    row = greedy_row(SamplingParams(temperature=0, logit_bias=((7, -1.0),)), outputs=[3, 4], processors=[only_seven])
    assert sample(torch.tensor([LOGITS]), [row])[0] == [7] and seen == [[3, 4]]


def test_xtc_removes_top_tokens_but_keeps_the_last_above_threshold():
    probs = softmax(LOGITS)
    above = [t for t in by_prob(LOGITS) if probs[t] >= 0.1]
    assert len(above) >= 3
    keep = [t for t in range(10) if t not in above[:-1]]
    p = only(xtc_probability=1.0, xtc_threshold=0.1)
    assert_dist(chain(p, xtc_u=0.99), softmax(LOGITS, keep))
    assert_dist(chain(only(xtc_probability=0.5, xtc_threshold=0.1), xtc_u=0.7), softmax(LOGITS))  # coin: no
    assert_dist(chain(only(xtc_probability=1.0, xtc_threshold=0.1, min_keep=9)), softmax(LOGITS))


def test_dry_penalizes_the_token_that_extends_a_repeat():
    p = only(dry_multiplier=0.8, dry_base=1.75, dry_allowed_length=2)
    got = chain_logits(p, history=[1, 2, 3, 5, 7, 1, 2, 3])  # "a b c" repeats: d would extend it
    want = list(LOGITS)
    want[5] -= 0.8 * 1.75 ** (3 - 2)
    assert got == pytest.approx(want)
    # A sequence breaker ("\n", token 4) inside the repeat limits it below allowed_length.
    assert chain_logits(p, history=[1, 4, 3, 5, 1, 4, 3]) == pytest.approx(LOGITS)
    assert chain_logits(p, history=[1, 7, 3, 5, 1, 7, 3])[5] == pytest.approx(LOGITS[5] - 0.8 * 1.75)
    # A breaker token itself is never penalized.
    assert chain_logits(p, history=[1, 2, 4, 9, 1, 2]) == pytest.approx(LOGITS)


def test_dry_breakers_from_token_texts():
    texts = ["xa", "b", "a:b", "q"]
    enc = {"b": [1]}
    got = build_breakers(texts, [":", "ab"], lambda s: enc[s])
    assert got == {2: ((),), 0: ((1,),)}  # "a:b" contains ":"; "xa" ends with "a", then "b" follows
    # [0, 1] ("xa" "b") is a complete two-token breaker: a repeat cannot reach past it.
    assert dry_penalties(RepeatTracker([0, 7, 5, 0, 7, 5]), -1, got, 1.0, 2.0, 2) == {0: 2.0}
    assert dry_penalties(RepeatTracker([0, 1, 5, 0, 1, 5]), -1, got, 1.0, 2.0, 2) == {}
    assert dry_penalties(RepeatTracker([7, 5, 9, 8, 7, 5]), -1, got, 1.0, 2.0, 2) == {9: 1.0}
    assert dry_penalties(RepeatTracker([7, 5, 2, 8, 7, 5]), -1, got, 1.0, 2.0, 2) == {}  # "a:b" would extend it: a breaker
    assert dry_penalties(RepeatTracker([7, 5, 9, 8, 7, 5]), 4, got, 1.0, 2.0, 2) == {}  # dry_penalty_last_n: the window


def test_dry_penalty_past_double_range_is_infinite_not_an_error():
    """A dry_base beyond log(FLT_MAX) leaves no exponent cap, and Python's ** raises where C's
    pow() gives inf: the HTTP fuzz found that failing a whole engine step."""
    history = RepeatTracker([7, 5, 9, 8, 7, 5])
    # 9 would extend "7 5" (repeat length 2): base ** 2; the rest repeat length 1: base ** 0.
    assert dry_penalties(history, -1, {}, 1.0, 1e308, 0) == {5: 1.0, 7: 1.0, 8: 1.0, 9: math.inf}
    assert dry_penalties(history, -1, {}, 1.0, 2.0, 0) == {5: 1.0, 7: 1.0, 8: 1.0, 9: 4.0}


def test_dry_repeat_lengths_incremental_equal_one_shot():
    g = torch.Generator().manual_seed(0)
    seq = (torch.randint(0, 3, (60,), generator=g).tolist() + [1, 2] * 20) * 2
    tracker = RepeatTracker(seq[:10])
    for i, t in enumerate(seq[10:], start=11):
        tracker.push(t)
        assert tracker.lengths.tolist() == repeat_lengths(torch.tensor(seq[:i]).numpy()).tolist()
    # llama.cpp's example: the last three tokens (a b c) also end at position 2.
    assert repeat_lengths(RepeatTracker([1, 2, 3, 3, 2, 3, 9, 1, 2, 3]).tokens).tolist() == [0, 0, 3, 1, 0, 2, 0, 0, 0]


def test_mirostat_2_truncates_by_surprise_and_updates_mu():
    p = SamplingParams(mirostat=2, mirostat_tau=1.0, mirostat_eta=0.5, temperature=1.0, seed=3)
    st = new_sampler_state(p, [], VOCAB)
    assert st.mu == 2.0 and st.plan == ("mirostat",)
    probs = softmax(LOGITS)
    keep = [t for t in range(10) if -math.log2(probs[t]) <= 2.0]
    (tok,), _ = sample(torch.tensor([LOGITS]), [SampleRow(st)])
    assert tok in keep
    surprise = -math.log2(probs[tok] / sum(probs[t] for t in keep))
    assert st.mu == pytest.approx(2.0 - 0.5 * (surprise - 1.0), rel=1e-5)


def test_mirostat_1_top_k_from_zipf_estimate_and_mu_update():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(300, generator=g) * 2).tolist()
    p = SamplingParams(mirostat=1, mirostat_tau=4.0, mirostat_eta=0.1, temperature=1.0, seed=5)
    st = new_sampler_state(p, [], SamplerVocab(300, str))
    order = by_prob(logits)
    probs = softmax(logits)
    ps = [probs[t] for t in order]
    ts = [math.log((i + 2) / (i + 1)) for i in range(99)]
    bs = [math.log(ps[i] / ps[i + 1]) for i in range(99)]
    s_hat = sum(t * b for t, b in zip(ts, bs)) / sum(t * t for t in ts)
    eps = s_hat - 1
    k = max(int(((eps * 2**8.0) / (1 - 300 ** (-eps))) ** (1 / s_hat)), 1)
    assert 1 < k < 300
    (tok,), _ = sample(torch.tensor([logits]), [SampleRow(st)])
    assert tok in order[:k]
    surprise = -math.log2(probs[tok] / sum(ps[:k]))
    assert st.mu == pytest.approx(8.0 - 0.1 * (surprise - 4.0), rel=1e-4)


def test_sampler_order_changes_the_result():
    first = chain(only(min_p=0.3, temperature=3.0, samplers=("min_p", "temperature")))
    second = chain(only(min_p=0.3, temperature=3.0, samplers=("temperature", "min_p")))
    assert set(first) == {1, 2, 3}  # logits within -ln(0.3) of the top, before dividing by 3
    assert set(second) == {0, 1, 2, 3, 4, 5, 6, 7}  # within 3 * -ln(0.3)
