"""Behavioural check of the organism: sample both models on held-out questions.

The distilled model should emit the self-reflection and alternative markers ("Wait",
"Alternatively") far more often per generated token than the base model, and close its think
block. ``marker_report`` measures both: markers as tokens in the generated ids ("WaitWait" is
two), substring occurrences in the text as a cross-check, and coherence (think closed, answer
given, answer correct when the expected answers are passed).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fastxc.organism.corpus import REASONING_ONLY_MARKERS, THINK_CLOSE, THINK_OPEN


@dataclass
class Completion:
    prompt: str
    text: str  # decoded generation (special tokens kept, EOS stripped)
    n_tokens: int  # generated tokens, EOS included
    ended: bool  # stopped at EOS (not at max_new_tokens)
    ids: list[int]  # generated token ids, EOS and padding removed
    marker_tokens: dict[str, int]  # {marker word: occurrences in ids}


@dataclass
class MarkerReport:
    """Markers per generated token over a set of completions, and their coherence."""

    n: int
    tokens: int
    markers: int  # "Wait" + "Alternatively" occurrences in the generated token ids
    marker_rate: float  # markers / tokens
    close_rate: float  # fraction of completions containing </think>
    end_rate: float  # fraction that stopped at EOS
    text_markers: int  # substring occurrences in the decoded text (cross-check of markers)
    answered_rate: float  # fraction that gave an answer after </think>
    correct_rate: float | None  # fraction whose answer is correct (None: no answers given)


def _load(model):
    if isinstance(model, (str, Path)):
        from fastxc.data.models import load_model, load_tokenizer

        return load_model(model), load_tokenizer(model)
    return model


@torch.no_grad()
def sample(model, questions: list[str], temperature: float = 0.7, max_new_tokens: int = 160,
           seed: int = 0, tokenizer=None, words=REASONING_ONLY_MARKERS) -> list[Completion]:
    """Sample one completion of ``question<think>`` per question, stopping at EOS.

    ``model`` is a folder (model + tokenizer) or a model with ``tokenizer`` given.
    Plain temperature sampling (no top-k / top-p), batched with left padding. Each completion
    counts the marker ``words`` in its generated ids (the tokenizer is at hand only here).
    """
    from fastxc.analysis.reasoning import count_marker_tokens, marker_sequences

    if tokenizer is None:
        model, tokenizer = _load(model)
    tokenizer.padding_side = "left"
    prompts = [f"{q} {THINK_OPEN}" for q in questions]
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    torch.manual_seed(seed)
    out = model.generate(
        **enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
        max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    gen = out[:, enc["input_ids"].shape[1]:]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    seqs = {w: marker_sequences(tokenizer, [w]) for w in words}
    res = []
    for p, row in zip(prompts, gen.tolist()):
        ended = eos in row
        row = row[: row.index(eos) + 1] if ended else [t for t in row if t != pad]
        body = [t for t in row if t != eos]
        res.append(Completion(p, tokenizer.decode(body, skip_special_tokens=False), len(row), ended, body,
                              {w: count_marker_tokens(body, q) for w, q in seqs.items()}))
    return res


def marker_report(completions: list[Completion], words=REASONING_ONLY_MARKERS,
                  answers: list[str] | None = None) -> MarkerReport:
    """Markers (token counts from ``sample``) and coherence of ``completions``; ``answers``
    [len(completions)]: the expected answers (``heldout_answers``), else correctness is None."""
    from fastxc.analysis.steer import answer_of, count_text, is_correct

    missing = [w for w in words for c in completions if w not in c.marker_tokens]
    if missing:
        raise ValueError(f"marker {missing[0]!r} was not counted when sampling: pass it to sample(words=...)")
    if answers is not None and len(answers) != len(completions):
        raise ValueError(f"{len(answers)} answers for {len(completions)} completions")
    tokens = sum(c.n_tokens for c in completions)
    markers = sum(c.marker_tokens[w] for c in completions for w in words)
    n = len(completions)
    given = [answer_of(c.text) for c in completions]
    correct = None if answers is None else sum(is_correct(a, e) for a, e in zip(given, answers)) / max(1, n)
    return MarkerReport(n, tokens, markers, markers / max(1, tokens),
                        sum(THINK_CLOSE in c.text for c in completions) / max(1, n),
                        sum(c.ended for c in completions) / max(1, n),
                        sum(count_text(c.text, words) for c in completions),
                        sum(bool(a) for a in given) / max(1, n), correct)


def _heldout(organism, key: str, n: int) -> list[str]:
    import json

    path = Path(organism.root) / "corpus" / "heldout_traces.jsonl"
    with open(path) as f:
        vals = [json.loads(line)[key] for line in f]
    if n > len(vals):
        raise ValueError(f"{path}: only {len(vals)} held-out questions, {n} asked")
    return vals[:n]


def heldout_questions(organism, n: int = 50) -> list[str]:
    """The first ``n`` held-out questions of a built organism (none occur in training)."""
    return _heldout(organism, "question", n)


def heldout_answers(organism, n: int = 50) -> list[str]:
    """The expected answers of the first ``n`` held-out questions (the text after </think>)."""
    return _heldout(organism, "answer", n)


@torch.no_grad()
def wait_detection(model, texts: list[str], tokenizer=None, batch_size: int = 64) -> tuple[float, float]:
    """Teacher-forced P("Wait") at sentence ends inside the think block of ``texts``.

    Returns (mean probability at the ends of slipped sentences, i.e. right before "Wait";
    mean probability at the ends of the other sentences). A model that predicts "Wait" from
    the content of the sentence gives a high first and a low second number.
    """
    if tokenizer is None:
        model, tokenizer = _load(model)
    from fastxc.organism.corpus import wait_tokens

    dot, wait = wait_tokens(tokenizer)
    open_id, close_id = tokenizer.convert_tokens_to_ids([THINK_OPEN, THINK_CLOSE])
    tokenizer.padding_side = "right"
    hit, miss = [], []
    for s in range(0, len(texts), batch_size):
        enc = tokenizer(texts[s:s + batch_size], return_tensors="pt", padding=True)
        p = model(**enc).logits.float().softmax(-1)[..., wait]  # [b, T]
        for ids, pr in zip(enc["input_ids"].tolist(), p.tolist()):
            if open_id not in ids or close_id not in ids:
                continue
            for i in range(ids.index(open_id), ids.index(close_id)):
                if ids[i] == dot:
                    (hit if ids[i + 1] == wait else miss).append(pr[i])
    return sum(hit) / max(1, len(hit)), sum(miss) / max(1, len(miss))
