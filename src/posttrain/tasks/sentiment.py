"""``sentiment``: continue a short film review; stands in for the IMDb task of the DPO paper.

Reviews come from a small grammar, lower case with spaced punctuation:
opening ``honestly , the plot was dull .`` and continuation
``the music was loud but the ending was superb .`` -- ``difficulty + 1`` clauses of
``the SUBJECT VERB ADJ`` joined by ``and`` (same sentiment) or ``but`` (opposite sentiment).

Gold score (rule-based, for checking; the paper's reward is a trained classifier, which
``classify.jsonl`` is for): with ``p`` positive and ``n`` negative words in the completion (a word
right after ``not``/``never``/``no`` counts for the other side),
``score = p / (p + n)``, and 0.5 when there is neither; an empty completion scores 0.0. A fraction
(not a count) so that repeating positive words earns nothing over one clean positive clause.

SFT continuations are mixed or neutral (score exactly 0.5: as many positive as negative words),
except a ``noise`` fraction that is negative (score 0): an SFT model is indifferent, and
RL / DPO can push it to positive continuations (score 1). Preference pairs put the more positive
continuation first.
"""

from __future__ import annotations

import random
import re

from posttrain.tasks.base import Rows, Task, chat, noisy_indices, split_questions

POSITIVE = ("great", "superb", "wonderful", "brilliant", "excellent", "beautiful", "charming",
            "delightful", "clever", "gripping", "moving", "fun", "lovely", "perfect")
NEGATIVE = ("awful", "boring", "dull", "terrible", "weak", "bad", "clumsy", "flat", "silly",
            "messy", "poor", "tedious", "bland", "lazy")
NEUTRAL = ("long", "short", "loud", "quiet", "simple", "familiar", "modern", "busy")
SUBJECTS = ("film", "movie", "acting", "plot", "story", "music", "ending", "cast", "script",
            "dialogue", "pacing", "soundtrack", "humour", "lead actor", "camera work")
VERBS = ("was", "felt", "seemed")
FRAMES = ("", "honestly ,", "overall ,", "i think", "to be fair ,", "in short ,")
NEGATORS = ("not", "never", "no")
INSTRUCTION = "Continue the review:"

_POS, _NEG = set(POSITIVE), set(NEGATIVE)
_WORD = re.compile(r"[a-z']+")


def counts(text: str) -> tuple[int, int]:
    """(positive, negative) word counts; a negator flips the sentiment of the word right after it."""
    words = _WORD.findall(text.lower())
    pos = neg = 0
    for i, w in enumerate(words):
        flip = i > 0 and words[i - 1] in NEGATORS
        if w in _POS:
            pos, neg = (pos, neg + 1) if flip else (pos + 1, neg)
        elif w in _NEG:
            pos, neg = (pos + 1, neg) if flip else (pos, neg + 1)
    return pos, neg


def verify(prompt: str, completion: str) -> float:
    """p / (p + n) over the completion's sentiment words, 0.5 with none, 0.0 for an empty completion."""
    if not completion.strip():
        return 0.0
    pos, neg = counts(completion)
    return 0.5 if pos + neg == 0 else pos / (pos + neg)


def _sign(adj: str) -> int:
    return 1 if adj in _POS else -1 if adj in _NEG else 0


def clause(rng: random.Random, subject: str, adj: str) -> str:
    return f"the {subject} {rng.choice(VERBS)} {adj}"


def continuation(rng: random.Random, n_clauses: int, level: float) -> str:
    """A continuation whose gold score is ``level``: 1 (positive), 0.5 (mixed / neutral) or 0 (negative)."""
    if level == 0.5:
        m = rng.randint(0, n_clauses // 2)  # as many positive as negative adjectives, the rest neutral
        kinds = [POSITIVE] * m + [NEGATIVE] * m + [NEUTRAL] * (n_clauses - 2 * m)
    else:
        k = rng.randint(1, n_clauses)
        kinds = [POSITIVE if level == 1.0 else NEGATIVE] * k + [NEUTRAL] * (n_clauses - k)
    rng.shuffle(kinds)
    adjs = [rng.choice(kind) for kind in kinds]
    subjects = rng.sample(SUBJECTS, n_clauses)
    text = clause(rng, subjects[0], adjs[0])
    for prev, adj, subject in zip(adjs, adjs[1:], subjects[1:]):
        conn = "but" if _sign(prev) * _sign(adj) < 0 else "and"  # "but" marks a change of sentiment
        text += f" {conn} {clause(rng, subject, adj)}"
    return text + " ."


def draw_opening(rng: random.Random) -> tuple[str, str]:
    """A review opening; identity = its text."""
    frame = rng.choice(FRAMES)
    adj = rng.choice(rng.choice((POSITIVE, NEGATIVE, NEUTRAL)))
    text = f"{clause(rng, rng.choice(SUBJECTS), adj)} ."
    text = f"{frame} {text}" if frame else text
    return text, text


def prompt_text(opening: str) -> str:
    return f"{INSTRUCTION} {opening}"


def labelled_review(rng: random.Random, opening: str, n_clauses: int) -> dict[str, str]:
    """A full review with a clear label: opening plus a clearly positive or negative continuation."""
    label = rng.choice(("positive", "negative"))
    text = f"{opening} {continuation(rng, n_clauses, 1.0 if label == 'positive' else 0.0)}"
    pos, neg = counts(text)
    if pos == neg:  # the opening cancelled the continuation: add one more clause of the label's side
        extra = continuation(rng, 1, 1.0 if label == "positive" else 0.0)
        text = f"{text} {extra}"
    pos, neg = counts(text)
    return {"text": text, "label": "positive" if pos > neg else "negative"}


def build(rng: random.Random, n_train: int, n_eval: int, noise: float, difficulty: int) -> Rows:
    n_clauses = difficulty + 1
    train, held = split_questions(rng, draw_opening, n_train, n_eval, "sentiment")
    negative = noisy_indices(rng, n_train, noise)
    sft, prefs = [], []
    for i, opening in enumerate(train):
        prompt = prompt_text(opening)
        sft.append(chat(prompt, continuation(rng, n_clauses, 0.0 if i in negative else 0.5)))
        hi, lo = rng.choice(((1.0, 0.5), (1.0, 0.0), (0.5, 0.0)))
        prefs.append({"prompt": prompt, "chosen": continuation(rng, n_clauses, hi),
                      "rejected": continuation(rng, n_clauses, lo)})
    return {
        "sft": sft,
        "prefs": prefs,
        "prompts": [{"prompt": prompt_text(o)} for o in train],
        "eval": [{"prompt": prompt_text(o)} for o in held],
        "classify": [labelled_review(rng, o, n_clauses) for o in train],
    }


TASK = Task(
    name="sentiment",
    description="continue a film review; gold score = share of positive words in the continuation",
    build=build,
    score=verify,
    levels=(1, 2, 3),
    graded=True,
)
