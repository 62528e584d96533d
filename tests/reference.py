"""Reading llama.cpp's recorded greedy runs (tests/data/*_greedy.jsonl) and scoring a model against them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DATA = Path(__file__).parent / "data"


@dataclass
class Agreement:
    steps: int
    top1: int
    top5_abs_err: float  # mean |ours - llama.cpp| over each step's top-5 tokens

    @property
    def top1_rate(self) -> float:
        return self.top1 / self.steps


def greedy_cases(name: str) -> list[dict]:
    with open(DATA / f"{name}_greedy.jsonl") as f:
        return [json.loads(line) for line in f]


# A greedy run may part from llama.cpp's only where llama.cpp put our token within this many
# nats of its own (test_reference_agreement.py says why; measured partings: <= 0.66).
PARTING_NATS = 1.0


def parting_gaps(outs: list[list[int]], cases: list[dict]) -> list[tuple[int, int, float]]:
    """(case, step, gap) where each of our greedy runs first differs from llama.cpp's: gap is
    llama.cpp's log-prob of its token minus that of ours (inf when ours is not in its top list)."""
    out = []
    for i, (ours, case) in enumerate(zip(outs, cases)):
        d = next((k for k, (a, b) in enumerate(zip(ours, case["tokens"])) if a != b), None)
        if d is None:
            continue
        step = dict(aligned_steps(case)).get(d)
        if step is None:  # llama.cpp reported nothing at that token (it ends inside a character)
            out.append((i, d, float("inf")))
            continue
        top = {t: lp for t, lp in step["top"]}
        out.append((i, d, round(top[case["tokens"][d]] - top.get(ours[d], float("-inf")), 3)))
    return out


def aligned_steps(case: dict) -> list[tuple[int, dict]]:
    """(index into case["tokens"], step) pairs.

    llama.cpp's server reports no probabilities for a token that ends inside a UTF-8
    character, so the steps are a subsequence of the tokens: match them by id in order.
    """
    out, k = [], 0
    tokens = case["tokens"]
    for step in case["steps"]:
        while tokens[k] != step["id"]:
            k += 1
        out.append((k, step))
        k += 1
    return out


def teacher_forced(engine, tokenizer, cases: list[dict]) -> Agreement:
    """Feed each prompt + llama.cpp's own tokens; compare our next-token log-probs at each step."""

    def log_probs(prompt: list[int], tokens: list[int], blocks: list[int]) -> list:
        logprobs = engine.runner.score(prompt + tokens, blocks).log_softmax(-1)
        return [logprobs[len(prompt) - 1 + k] for k in range(len(tokens))]

    return _agreement(engine, tokenizer, cases, log_probs)


def teacher_forced_decode(engine, tokenizer, cases: list[dict]) -> Agreement:
    """teacher_forced, but llama.cpp's tokens go in one per step as decode rows (the path
    --decode-dtype concerns); the prompt is one prefill step."""
    import torch

    from runtime.forward_batch import ForwardBatch

    runner = engine.runner

    def log_probs(prompt: list[int], tokens: list[int], blocks: list[int]) -> list:
        rows = []
        done, feed = 0, prompt
        for k in range(len(tokens)):
            decode = [done > 0]  # one token fed back, as a generated one is
            batch = ForwardBatch.build([feed], [done], [blocks], runner.block_size, decode=decode)
            hidden = runner.forward([], batch)
            with torch.inference_mode():
                rows.append(runner.model.logits(hidden[batch.logits_indices]).log_softmax(-1)[0])
            done += len(feed)
            feed = [tokens[k]]
        return rows

    return _agreement(engine, tokenizer, cases, log_probs)


def _agreement(engine, tokenizer, cases: list[dict], log_probs) -> Agreement:
    """Score log_probs(prompt, llama.cpp's tokens, blocks) -> our log-probs before each token."""
    steps = top1 = 0
    err_sum, err_n = 0.0, 0
    for case in cases:
        prompt = tokenizer.encode(case["prompt"], add_special=case.get("add_bos", True))
        n = len(prompt) + len(case["tokens"])
        blocks = engine.blocks.allocate(engine.blocks.blocks_needed(n, 0))
        try:
            rows = log_probs(prompt, case["tokens"], blocks)
        finally:
            engine.blocks.free(blocks)
        for k, step in aligned_steps(case):
            row = rows[k]
            steps += 1
            top1 += int(row.argmax()) == step["top"][0][0]
            for tid, lp in step["top"][:5]:
                err_sum += abs(float(row[tid]) - lp)
                err_n += 1
    return Agreement(steps, top1, err_sum / err_n)
