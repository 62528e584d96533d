"""The fill-in-the-middle prompt from a model's FIM tokens, assembled as llama.cpp's server does.

Layout (the repo-level pattern of Qwen2.5-Coder, arXiv 2409.12186; the
FIM_REP / FIM_SEP parts only when the vocabulary has those tokens):

    [FIM_REP]myproject\\n[FIM_SEP]{filename}\\n{extra text}...[FIM_SEP]filename\\n
    [BOS][FIM_PRE]{prefix}{prompt}[FIM_SUF]{suffix}[FIM_MID]

Without FIM_SEP each extra chunk is introduced by "\\n\\n--- snippet ---\\n\\n".
The prefix keeps its last 3/4 of a batch, the suffix its first quarter minus
the prompt; the extra context takes what the context has left after one batch
and twice n_predict, its last tokens first. With spm_infill the suffix part
comes before the prefix part.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from runtime.errors import InvalidRequestError
from runtime.tokenizer import Tokenizer

_SNIPPET = "\n\n--- snippet ---\n\n"
_REPO = "myproject\n"
_CURRENT_FILE = "filename\n"


@dataclass(frozen=True)
class ExtraChunk:
    """One piece of extra context (input_extra): a file's text and, optionally, its name."""

    text: str
    filename: str = "tmp"


def fim_ids(tok: Tokenizer) -> tuple[int, int, int]:
    """(prefix, suffix, middle) token ids; InvalidRequestError naming what the model lacks."""
    ids = tok.special_ids
    pre, suf, mid = ids.get("fim_pre"), ids.get("fim_suf"), ids.get("fim_mid")
    missing = "".join(
        f"{what} token is missing. "
        for what, i in (("prefix", pre), ("suffix", suf), ("middle", mid))
        if i is None
    )
    if missing:
        raise InvalidRequestError(f"Infill is not supported by this model: {missing.strip()}")
    assert pre is not None and suf is not None and mid is not None
    return pre, suf, mid


def infill_prompt(
    tok: Tokenizer,
    prefix: str | Sequence[str | int],
    suffix: str | Sequence[str | int],
    extra: Sequence[ExtraChunk],
    prompt: Sequence[int],
    n_batch: int,
    n_predict: int,
    n_ctx: int,
    spm_infill: bool = False,
) -> list[int]:
    """The token ids of the FIM prompt (see the module docstring); `prompt` goes after the prefix."""
    pre, suf, mid = fim_ids(tok)

    def text(s: str) -> list[int]:
        return tok.encode(s, add_special=False, parse_special=False)

    def mixed(x: str | Sequence[str | int]) -> list[int]:
        if isinstance(x, str):
            return text(x)
        return [t for p in x for t in (text(p) if isinstance(p, str) else [p])]

    rep, sep = tok.special_ids.get("fim_rep"), tok.special_ids.get("fim_sep")
    extra_ids: list[int] = []
    if rep is not None:
        extra_ids += [rep, *text(_REPO)]
    for chunk in extra:
        extra_ids += [sep, *text(chunk.filename + "\n")] if sep is not None else text(_SNIPPET)
        extra_ids += text(chunk.text)
    if sep is not None:
        extra_ids += [sep, *text(_CURRENT_FILE)]

    prefix_ids, suffix_ids = mixed(prefix), mixed(suffix)
    quarter = n_batch // 4
    n_prefix = min(len(prefix_ids), 3 * quarter)
    n_suffix = min(len(suffix_ids), max(0, quarter - (2 + len(prompt))))
    n_extra = min(max(0, n_ctx - n_batch - 2 * n_predict), len(extra_ids))

    head = [pre, *prefix_ids[len(prefix_ids) - n_prefix :], *prompt]
    tail = [suf, *suffix_ids[:n_suffix]]
    first, second = (tail, head) if spm_infill else (head, tail)
    bos = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
    return extra_ids[len(extra_ids) - n_extra :] + bos + first + second + [mid]
