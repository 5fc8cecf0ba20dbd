"""Seeded synthetic corpus for the model organism.

Two kinds of documents, one string each:

- **general text**: short narrative and factual sentences, arithmetic statements and questions
  with plain answers. It may use the deductive ("Therefore," "Thus") and contrastive ("But,"
  "However,") markers, as ordinary English does, but never the self-reflection ("Wait") or
  alternative ("Alternatively") markers.
- **reasoning traces** for small problems (arithmetic, number sequences, comparisons, word
  problems): ``question <think> reasoning </think> answer``, one reasoning sentence per line
  (``STEP_SEP``). About ``slip_rate`` of them (default 0.6) state one step wrongly and correct
  it on the next line with ``Wait, ...``.

A slipped step uses exactly the sentence shape of the correct step ("3 plus 8 is 12." where
the correct trace says "3 plus 8 is 11."), and nothing before it differs, so a model can only
predict "Wait" by checking the content of the step.

The general text states its arithmetic in words ("Three and eight make eleven.", "Fifty four
take away twenty leaves thirty four.", "What is fifty four minus forty three? Eleven.") and
never contains a digit or a line break, while traces use digits, one step per line. So checking
a trace's step is a skill the base model does not have: the distilled model learns it from the
traces, as R1 distillation teaches reasoning, and the signal that precedes "Wait" is its own
(with digits in the general text the base model judged the steps too, and the crosscoder found
a shared "wrong step" feature instead of a distilled one).

Everything is drawn from one ``random.Random(seed)``: the same seed gives the same corpus.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# Reasoning sentences go one per line (as in R1 traces); general text never contains a line
# break, so the token right before a "Wait" is one the base model has never seen.
STEP_SEP = "\n"
# Markers of the seed study (section 5), by reasoning category.
MARKERS = {
    "self-reflection": ("Wait",),
    "deductive": ("Therefore", "Thus"),
    "alternative": ("Alternatively",),
    "contrastive": ("But", "However"),
}
# The markers that must never occur in general text: the distilled model's new behaviour.
REASONING_ONLY_MARKERS = ("Wait", "Alternatively")
_REASONING_ONLY_RE = re.compile(r"\b(?:Wait|Alternatively)\b")

_PEOPLE = [
    ("Tom", "he"), ("Ann", "she"), ("Sam", "he"), ("Mia", "she"), ("Ben", "he"),
    ("Lily", "she"), ("Max", "he"), ("Zoe", "she"), ("Leo", "he"), ("Eva", "she"),
    ("Jack", "he"), ("Rose", "she"),
]
_OBJECTS = ["apples", "books", "pens", "cards", "coins", "eggs", "stamps", "shells",
            "marbles", "cookies", "flowers", "rocks"]
_PLACES = ["park", "shop", "river", "school", "farm", "beach", "market", "forest", "lake",
           "garden"]
_ANIMALS = ["cat", "dog", "bird", "fox", "horse", "duck", "frog", "goat", "rabbit", "cow"]
_ADJS = ["small", "big", "red", "brown", "white", "black", "old", "young", "quiet", "happy"]
_FEELINGS = ["happy", "tired", "hungry", "calm", "glad", "sleepy", "cold", "warm"]
_FACTS = [
    "The sun is hot.", "Snow is cold.", "The sky is blue.", "Grass is green.",
    "A dog has four legs.", "A bird has two wings.", "Fish live in water.",
    "Cows eat grass.", "Ice melts in the sun.", "The moon shines at night.",
    "Bees make honey.", "Rain falls from clouds.", "A week has seven days.",
    "A year has twelve months.", "Trees grow from seeds.", "Milk comes from cows.",
    "Frogs can jump.", "Birds build nests.", "The sea is salty.", "Fire is hot.",
    "A spider has eight legs.", "Apples grow on trees.", "Night follows day.",
    "Water boils when it is hot.", "Sand is found on the beach.", "Owls hunt at night.",
]
_QA = [
    ("What color is the sky?", "Blue."), ("What color is grass?", "Green."),
    ("How many legs does a dog have?", "Four."), ("Where do fish live?", "In water."),
    ("What do cows eat?", "Grass."), ("What do bees make?", "Honey."),
    ("How many days are in a week?", "Seven."), ("Is the sun hot or cold?", "Hot."),
    ("Is snow hot or cold?", "Cold."), ("When does the moon shine?", "At night."),
    ("How many wings does a bird have?", "Two."), ("Where does rain come from?", "Clouds."),
    ("How many legs does a spider have?", "Eight."), ("Where do apples grow?", "On trees."),
]


@dataclass
class Step:
    """One reasoning sentence, optionally with a wrong twin of the same shape."""

    text: str  # the correct sentence, e.g. "3 plus 8 is 11."
    wrong: str | None = None  # same shape, wrong content, e.g. "3 plus 8 is 12."
    fix: str | None = None  # what follows "Wait, ", e.g. "3 plus 8 is 11, not 12."


@dataclass
class Problem:
    """A small problem: its question, reasoning steps, optional alternative check, answer."""

    kind: str
    question: str
    steps: list[Step]
    alternative: str  # sentence after "Alternatively, "
    conclusion: str  # sentence after "Therefore, " / "Thus, "
    answer: str
    facts: list[str] = field(default_factory=list)  # true statements usable in general text


@dataclass
class Trace:
    """A rendered reasoning trace and how it was made."""

    question: str
    text: str  # "question <think> reasoning </think> answer"
    answer: str
    kind: str
    slipped: bool
    alternative: bool


@dataclass
class Corpus:
    """A seeded corpus: training documents and held-out material."""

    general: list[str]
    traces: list[Trace]
    heldout_general: list[str]
    heldout_traces: list[Trace]  # their questions occur nowhere in the training documents

    @property
    def heldout_questions(self) -> list[str]:
        return [t.question for t in self.heldout_traces]


# Slips are 3-6 off: a gross error a small model can notice from the content (off-by-one
# results sit next to the right one in a tiny model's number embedding and go unnoticed).
SLIP_DELTAS = (3, 4, 5, 6, -3, -4, -5, -6)


def _off(rng: random.Random, value: int, deltas=SLIP_DELTAS) -> int:
    """A wrong value close to ``value`` (never negative, never equal)."""
    while True:
        w = value + rng.choice(deltas)
        if w >= 0 and w != value:
            return w


def _arith_step(rng: random.Random, a: int, op: str, b: int, deltas=SLIP_DELTAS) -> Step:
    c = a + b if op == "plus" else a - b
    w = _off(rng, c, deltas)
    return Step(f"{a} {op} {b} is {c}.", f"{a} {op} {b} is {w}.", f"{a} {op} {b} is {c}, not {w}.")


def _addition(rng: random.Random) -> Problem:
    if rng.random() < 0.3:  # single digits: make ten, then add the rest
        a, b = rng.randint(3, 9), rng.randint(3, 9)
        if a + b <= 10:
            b = 10 - a + rng.randint(1, 3)
        need = 10 - a
        steps = [Step(f"{b} is {need} plus {b - need}."),
                 _arith_step(rng, a, "plus", need),
                 _arith_step(rng, 10, "plus", b - need)]
        c = a + b
    else:
        a, b = rng.randint(11, 89), rng.randint(11, 89)
        ta, ua, tb, ub = a // 10 * 10, a % 10, b // 10 * 10, b % 10
        steps = [_arith_step(rng, ta, "plus", tb, deltas=(10, 20, -10, -20)),
                 _arith_step(rng, ua, "plus", ub),
                 Step(f"{ta + tb} plus {ua + ub} is {a + b}.")]
        c = a + b
    return Problem("arithmetic", f"What is {a} plus {b}?", steps,
                   f"{b} plus {a} is {c} too.", f"the answer is {c}.", str(c),
                   [s.text for s in steps])


def _subtraction(rng: random.Random) -> Problem:
    a = rng.randint(21, 99)
    b = rng.randint(11, a - 5)
    tb, ub = b // 10 * 10, b % 10
    mid = a - tb
    steps = [_arith_step(rng, a, "minus", tb, deltas=(10, 20, -10, -20)),
             Step(f"{mid} minus {ub} is {mid - ub}.")]
    c = a - b
    return Problem("arithmetic", f"What is {a} minus {b}?", steps,
                   f"{c} plus {b} is {a}, so it checks.", f"the answer is {c}.", str(c),
                   [s.text for s in steps])


def _sequence(rng: random.Random) -> Problem:
    d = rng.randint(2, 9)
    t = [rng.randint(1, 60)]
    for _ in range(3):
        t.append(t[-1] + d)
    nxt = t[-1] + d
    steps = [_arith_step(rng, t[i + 1], "minus", t[i]) for i in range(3)]
    steps.append(Step(f"So the step is {d}."))
    steps.append(_arith_step(rng, t[-1], "plus", d))
    seq = ", ".join(str(x) for x in t)
    return Problem("sequence", f"What comes next: {seq}?", steps,
                   f"{nxt} minus {t[-1]} is {d}, the same step.",
                   f"the next number is {nxt}.", str(nxt), [s.text for s in steps[:3]])


def _comparison(rng: random.Random) -> Problem:
    x, y = rng.sample(range(11, 100), 2)
    larger = rng.random() < 0.5
    word = "larger" if larger else "smaller"
    big, small = max(x, y), min(x, y)
    win = big if larger else small
    steps = [Step(f"{x} has {x // 10} tens."), Step(f"{y} has {y // 10} tens.")]
    if x // 10 != y // 10:
        hi, lo = max(x // 10, y // 10), min(x // 10, y // 10)
        steps.append(Step(f"But {hi} is more than {lo}.", f"But {hi} is less than {lo}.",
                          f"{hi} is more than {lo}, not less."))
    else:
        hi, lo = max(x % 10, y % 10), min(x % 10, y % 10)
        steps.append(Step(f"However, {hi} is more than {lo}.", f"However, {hi} is less than {lo}.",
                          f"{hi} is more than {lo}, not less."))
    return Problem("comparison", f"Which is {word}, {x} or {y}?", steps,
                   f"{big} minus {small} is {big - small}, so {big} is larger.",
                   f"{win} is {word}.", str(win), [f"{hi} is more than {lo}.", f"{lo} is less than {hi}."])


def _word_problem(rng: random.Random) -> Problem:
    (name, he), (other, _) = rng.sample(_PEOPLE, 2)
    obj = rng.choice(_OBJECTS)
    He = he.capitalize()
    if rng.random() < 0.5:
        a, b = rng.randint(2, 12), rng.randint(2, 9)
        c = a + b
        q = f"{name} has {a} {obj}. {He} buys {b} more. How many {obj} does {name} have now?"
        steps = [Step(f"{name} starts with {a} {obj}."),
                 Step(f"{He} gets {b} more, so we add.", f"{He} gets {b} more, so we subtract.",
                      f"{he} gets more, so we add."),
                 _arith_step(rng, a, "plus", b)]
        alt = f"{c} minus {b} is {a}, so it checks."
    else:
        a = rng.randint(6, 19)
        b = rng.randint(2, a - 2)
        c = a - b
        q = f"{name} has {a} {obj}. {He} gives {b} to {other}. How many {obj} does {name} have now?"
        steps = [Step(f"{name} starts with {a} {obj}."),
                 Step(f"But {he} gives {b} away, so we subtract.",
                      f"But {he} gives {b} away, so we add.", f"{he} gives some away, so we subtract."),
                 _arith_step(rng, a, "minus", b)]
        alt = f"{c} plus {b} is {a}, so it checks."
    return Problem("word", q, steps, alt, f"{name} has {c} {obj}.", str(c), [steps[2].text])


_PROBLEMS = [(_addition, 0.3), (_subtraction, 0.15), (_sequence, 0.2), (_comparison, 0.15),
             (_word_problem, 0.2)]


def sample_problem(rng: random.Random) -> Problem:
    """One problem, kinds drawn with fixed weights."""
    fns, weights = zip(*_PROBLEMS)
    return rng.choices(fns, weights)[0](rng)


def render_trace(problem: Problem, rng: random.Random, slip: bool, alternative: bool) -> Trace:
    """``question <think> reasoning </think> answer``; a slip is corrected after "Wait,"."""
    parts = []
    slippable = [i for i, s in enumerate(problem.steps) if s.wrong is not None]
    at = rng.choice(slippable) if slip else -1
    for i, s in enumerate(problem.steps):
        if i == at:  # the wrong twin, then the correction; the next steps are the correct ones
            parts.append(s.wrong)
            parts.append(f"Wait, {s.fix}")
        else:
            parts.append(s.text)
    if alternative:
        parts.append(f"Alternatively, {problem.alternative}")
    parts.append(f"{rng.choice(['Therefore', 'Thus'])}, {problem.conclusion}")
    text = f"{problem.question} {THINK_OPEN} {STEP_SEP.join(parts)} {THINK_CLOSE} {problem.answer}"
    return Trace(problem.question, text, problem.answer, problem.kind, at >= 0, alternative)


def reasoning_trace(rng: random.Random, slip_rate: float = 0.6, alt_rate: float = 0.35) -> Trace:
    """A fresh problem rendered as a trace."""
    p = sample_problem(rng)
    return render_trace(p, rng, rng.random() < slip_rate, rng.random() < alt_rate)


def _narrative(rng: random.Random) -> str:
    (name, he), (other, _) = rng.sample(_PEOPLE, 2)
    He = he.capitalize()
    place, animal, adj, feel = (rng.choice(x) for x in (_PLACES, _ANIMALS, _ADJS, _FEELINGS))
    n, obj = rng.randint(2, 12), rng.choice(_OBJECTS)
    g = rng.randint(1, n)
    num = number_words
    pool = [
        f"{name} went to the {place}.", f"{He} saw a {adj} {animal}.",
        f"The {animal} was {rng.choice(_ADJS)}.", f"{name} had {num(n)} {obj}.",
        f"{He} gave {num(g)} {obj} to {other}.", f"{other} said thank you.",
        f"Then {he} went home.", f"{He} was {feel}.", f"{name} likes the {place}.",
        "It was a sunny day.", "It rained in the evening.",
    ]
    k = rng.randint(2, 4)
    sents = rng.sample(pool, k)
    r = rng.random()
    if r < 0.2:
        sents.append(f"However, {he} was {rng.choice(_FEELINGS)}.")
    elif r < 0.35:
        sents.append(f"But the {animal} ran away.")
    elif r < 0.5:
        sents.append(f"Therefore, {he} was {rng.choice(_FEELINGS)}.")
    elif r < 0.6:
        sents.append("Thus, the day ended.")
    return " ".join(sents)


def _factual(rng: random.Random) -> str:
    sents = rng.sample(_FACTS, rng.randint(2, 4))
    if rng.random() < 0.2:
        sents.append("Thus, the world is full of life.")
    return " ".join(sents)


_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
         "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    """0 <= n < 1000 in English words ("forty seven", "one hundred and six")."""
    if not 0 <= n < 1000:
        raise ValueError(f"number_words covers 0..999, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    rest = n % 100
    return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))


def _worded(a: int, op: str, b: int) -> str:
    """An arithmetic fact in the general text's surface form (never the traces' digits)."""
    A, B = number_words(a).capitalize(), number_words(b)
    if op == "plus":
        return f"{A} and {B} make {number_words(a + b)}."
    if op == "minus":
        return f"{A} take away {B} leaves {number_words(a - b)}."
    raise ValueError(op)


def _more_text(hi: int, lo: int, more: bool) -> str:
    s = f"{number_words(hi)} is more than {number_words(lo)}." if more else \
        f"{number_words(lo)} is less than {number_words(hi)}."
    return s[0].upper() + s[1:]


def _arith_fact(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.35:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return _worded(a, "plus", b)
    if r < 0.5:
        a, b = rng.randint(1, 8) * 10, rng.randint(1, 8) * 10
        return _worded(a, "plus", b)
    if r < 0.7:
        b = rng.randint(1, 9)
        a = b + rng.randint(0, 30)
        return _worded(a, "minus", b)
    if r < 0.8:
        a, b = rng.randint(2, 12), rng.randint(2, 9)
        return _worded(a, "plus", b)
    if r < 0.9:
        x, y = rng.sample(range(0, 10), 2)
        return _more_text(max(x, y), min(x, y), rng.random() < 0.5)
    x = rng.randint(11, 99)
    return f"{number_words(x).capitalize()} has {number_words(x // 10)} tens."


_FACT_RE = re.compile(r"^(\d+) (plus|minus) (\d+) is \d+\.$")
_MORE_RE = re.compile(r"^(\d+) is (more|less) than (\d+)\.$")


def _general_fact(step: str) -> str:
    """A problem's true step sentence restated in the general text's surface form."""
    m = _FACT_RE.match(step)
    if m:
        return _worded(int(m[1]), m[2], int(m[3]))
    m = _MORE_RE.match(step)
    if m:
        a, b = int(m[1]), int(m[3])
        return _more_text(max(a, b), min(a, b), m[2] == "more")
    s = re.sub(r"\d+", lambda d: number_words(int(d[0])), step)
    return s[0].upper() + s[1:]


def _arithmetic(rng: random.Random) -> str:
    if rng.random() < 0.5:  # the true steps of a problem, stated plainly
        sents = [_general_fact(f) for f in rng.sample(sample_problem(rng).facts, 1)]
        sents += [_arith_fact(rng) for _ in range(2)]
    else:
        sents = [_arith_fact(rng) for _ in range(rng.randint(3, 5))]
    return " ".join(sents)


def _question(rng: random.Random) -> str:
    if rng.random() < 0.4:
        q, a = rng.choice(_QA)
        return f"{q} {a}"
    p = sample_problem(rng)
    q = re.sub(r"\d+", lambda d: number_words(int(d[0])), p.question)
    return f"{q} {number_words(int(p.answer)).capitalize()}."


_GENERAL = [(_narrative, 0.3), (_factual, 0.15), (_arithmetic, 0.35), (_question, 0.2)]


def general_text(rng: random.Random) -> str:
    """One general document (never contains "Wait" or "Alternatively")."""
    fns, weights = zip(*_GENERAL)
    return rng.choices(fns, weights)[0](rng)


def build_corpus(seed: int = 0, n_general: int = 20000, n_traces: int = 10000,
                 n_heldout: int = 200, slip_rate: float = 0.6, alt_rate: float = 0.35) -> Corpus:
    """The training documents and the held-out ones, all from ``random.Random(seed)``.

    Held-out traces are drawn until ``n_heldout`` have a question that occurs in no training
    document, so sampling on them measures behaviour, not recall.
    """
    rng = random.Random(seed)
    general = [general_text(rng) for _ in range(n_general)]
    traces = [reasoning_trace(rng, slip_rate, alt_rate) for _ in range(n_traces)]
    seen_q = {t.question for t in traces}
    # General "questions with plain answers" reuse problem questions: exclude those too.
    seen_text = general
    held_rng = random.Random(f"heldout-{seed}")
    heldout_traces: list[Trace] = []
    used = set(seen_q)
    general_qs = {g.rsplit("?", 1)[0] + "?" for g in seen_text if "?" in g}
    while len(heldout_traces) < n_heldout:
        t = reasoning_trace(held_rng, slip_rate, alt_rate)
        if t.question in used or t.question in general_qs:
            continue
        used.add(t.question)
        heldout_traces.append(t)
    heldout_general = [general_text(held_rng) for _ in range(n_heldout)]
    return Corpus(general, traces, heldout_general, heldout_traces)


def count_markers(text: str, words=REASONING_ONLY_MARKERS) -> int:
    """Occurrences of whole-word markers in ``text``."""
    return len(re.findall(r"\b(?:" + "|".join(map(re.escape, words)) + r")\b", text))


def wait_tokens(tokenizer) -> tuple[int, int]:
    """(id of the token before "Wait" where a trace reflects, id of "Wait" there).

    The first is the last token of a sentence end plus ``STEP_SEP`` (which precedes every
    reasoning sentence), the second the first token of "Wait" after it.
    """
    ids = tokenizer(f"1.{STEP_SEP}Wait,", add_special_tokens=False)["input_ids"]
    at = next(i for i, t in enumerate(ids) if "Wait" in tokenizer.decode([t]))
    return ids[at - 1], ids[at]
