"""sample() over a batch of rows: batched equals alone, seeds reproduce, log-probs, vocabulary checks."""

import pytest
import torch

from runtime.errors import InvalidRequestError
from runtime.sampler import SampleRow, SamplerVocab, new_sampler_state, sample
from runtime.sampling_params import SamplingParams
from tests.test_sampler import LOGITS, VOCAB, greedy_row


def random_logits(n, v, seed):
    return torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_rows_batched_equal_each_row_alone():
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, logit_bias=((5, 4.0),)),
        SamplingParams(temperature=0, repeat_penalty=1.5),  # penalties: through the chain
        SamplingParams(temperature=-1, top_k=3, top_p=0.5),
    ]
    assert [new_sampler_state(p, [], VOCAB).greedy for p in params] == [True, True, False, True]
    logits = random_logits(4, 10, 0)
    alone = [sample(logits[i : i + 1], [greedy_row(p, [1, 2])])[0][0] for i, p in enumerate(params)]
    together, _ = sample(logits, [greedy_row(p, [1, 2]) for p in params])
    assert together == alone
    assert together[0] == int(logits[0].argmax())


MIX = [
    SamplingParams(seed=1),
    SamplingParams(seed=2, top_k=5, top_p=0.5, temperature=1.5),
    SamplingParams(seed=3, xtc_probability=0.5, xtc_threshold=0.05, min_p=0.0),
    SamplingParams(seed=4, mirostat=2),
    SamplingParams(seed=5, repeat_penalty=1.3, dry_multiplier=0.8, typical_p=0.9),
    SamplingParams(seed=6, top_k=0, top_p=1.0, min_p=0.0, temperature=0.7),
    SamplingParams(seed=7, dynatemp_range=0.5, top_n_sigma=2.0),
    SamplingParams(seed=1),
]


def test_seeded_rows_draw_the_same_alone_or_in_any_batch():
    v, steps = 300, 12
    logits = [random_logits(len(MIX), v, 100 + s) for s in range(steps)]
    for x in logits:
        x[7] = x[0]
    vocab = SamplerVocab(v, str)

    def run(order):
        states = {i: new_sampler_state(MIX[i], [1, 2, 3], vocab) for i in order}
        out = {i: [] for i in order}
        for s in range(steps):
            rows = [SampleRow(states[i], out[i]) for i in order]
            ids, _ = sample(logits[s][order], rows)
            for i, t in zip(order, ids):
                out[i].append(t)
        return out

    together = run(list(range(len(MIX))))
    assert together[0] == together[7]  # same seed, same params, same logits
    assert run([5, 2, 0, 7, 3]) == {i: together[i] for i in [5, 2, 0, 7, 3]}
    for i in range(len(MIX)):
        assert run([i]) == {i: together[i]}


def test_random_seed_is_recorded_and_reproducible():
    st = new_sampler_state(SamplingParams(), [], VOCAB)
    assert 0 <= st.seed < 2**32
    again = new_sampler_state(SamplingParams(seed=st.seed), [], VOCAB)
    logits = random_logits(1, 10, 7)
    assert [sample(logits, [SampleRow(st)])[0] for _ in range(5)] == [
        sample(logits, [SampleRow(again)])[0] for _ in range(5)
    ]


def test_logprobs_are_the_raw_distribution():
    row = greedy_row(SamplingParams(temperature=0, n_probs=3, logit_bias=((9, 100.0),)))
    (tok,), (lp,) = sample(torch.tensor([LOGITS]), [row])
    raw = torch.tensor(LOGITS).log_softmax(0)
    assert tok == 9 and lp.token_id == 9 and lp.logprob == pytest.approx(float(raw[9]))
    assert [t for t, _ in lp.top] == [1, 2, 3] and lp.top[0][1] == pytest.approx(float(raw[1]))


def test_state_rejects_ids_outside_the_vocabulary():
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        new_sampler_state(SamplingParams(logit_bias=((10, 1.0),)), [], VOCAB)
    with pytest.raises(InvalidRequestError, match="penalty_prompt_tokens"):
        new_sampler_state(SamplingParams(repeat_penalty=1.1, penalty_prompt_tokens=(99,)), [], VOCAB)


def test_vocab_from_tokenizer_is_cached_and_finds_newlines():
    class Tok:
        vocab_size, eog_ids = 4, frozenset({3})

        def token_text(self, i):
            return ["x", "\n", "y", "</s>"][i]

        def encode(self, text, add_special=True, parse_special=False):
            return [1] if text == "\n" else [0]

    v = SamplerVocab.from_tokenizer(tok := Tok())
    assert SamplerVocab.from_tokenizer(tok) is v and v.newline_ids() == (1,) and v.eog_ids == {3}
