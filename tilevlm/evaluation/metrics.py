"""The metrics small-VLM papers report, each a pure function of (prediction, reference).

- `exact_match`: tilevlm's own quiz (case, spaces and a final period do not count).
- `choice_letter` + `multiple_choice`: the option letter read from free text, the way lmms-eval
  scores MMStar / AI2D / ScienceQA (a bare letter, "(B)", "B.", "b) ...", "The answer is B").
- `vqa_accuracy`: VQAv2 / TextVQA's accuracy over 10 human answers, min(1, matches / 3) averaged
  over the 10 leave-one-out subsets, after the standard answer normalisation.
- `anls`: DocVQA's average normalised Levenshtein similarity (0 below the 0.5 threshold).
- `relaxed_accuracy`: ChartQA's (numbers within 5 % of the target count, else exact match).
"""

from __future__ import annotations

import re
from typing import Sequence


def normalize_answer(text: str) -> str:
    """Case, surrounding whitespace, inner runs of spaces and a final period do not count."""
    return " ".join(text.strip().lower().split()).rstrip(".").strip()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


# ----------------------------------------------------------------------------- multiple choice

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_PHRASES = ("the correct answer is", "the answer is", "correct answer is", "answer is",
            "the correct option is", "option", "answer:", "answer")


def choice_letter(prediction: str, n_choices: int) -> str | None:
    """The option letter a free-text answer names (A, B, ... of `n_choices`), or None.

    In order: the whole answer is a letter; it opens with one ("B", "(B)", "B.", "b) red",
    "B: red"); an answer phrase names one ("The answer is (B).", "Answer: c"); a "(B)" anywhere.
    """
    valid = LETTERS[:n_choices]
    text = prediction.strip().strip(".,!?;:'\"").strip()
    found = re.match(r"^\(?([A-Za-z])\)?(?:[.):]|\s|$)", text)
    if found and found.group(1).upper() in valid and (len(text) == 1 or not text[1:2].isalpha()):
        return found.group(1).upper()
    lower = text.lower()
    for phrase in _PHRASES:
        at = lower.rfind(phrase)
        if at >= 0:
            after = re.match(r"^\s*\(?([A-Za-z])\)?(?![A-Za-z])", text[at + len(phrase):])
            if after and after.group(1).upper() in valid:
                return after.group(1).upper()
    inside = re.findall(r"\(([A-Z])\)", text)
    return next((c for c in reversed(inside) if c in valid), None)


def multiple_choice(prediction: str, answer_letter: str, n_choices: int) -> float:
    return float(choice_letter(prediction, n_choices) == answer_letter.strip().upper())


# ----------------------------------------------------------------------------- VQA accuracy

_CONTRACTIONS = {  # the official VQA evaluation's list, the forms that occur in answers
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itll": "it'll", "let's": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "shant": "shan't",
    "shed": "she'd", "shes": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "somebodyd": "somebody'd", "someoned": "someone'd", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed": "we'd", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!"
_PERIOD = re.compile(r"\.(?!\d)")  # what the official pattern does: a period not before a digit
_COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")


def normalize_vqa(answer: str) -> str:
    """The VQA challenge's answer normalisation: lower case; each punctuation mark dropped where
    it touches a space (or the text has a comma inside a number), else made a space; periods not
    before a digit removed; number words as digits; articles dropped; contractions restored."""
    original = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    text = original
    for p in _PUNCTUATION:  # the decision looks at the original text, as the official code does
        dropped = f"{p} " in original or f" {p}" in original or _COMMA_NUMBER.search(original)
        text = text.replace(p, "" if dropped else " ")
    text = _PERIOD.sub("", text)
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """min(1, humans who gave the prediction / 3), averaged over the leave-one-out subsets."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_vqa(prediction)
    refs = [normalize_vqa(a) for a in answers]
    scores = [min(1.0, sum(r == pred for j, r in enumerate(refs) if j != i) / 3)
              for i in range(len(refs))]
    return sum(scores) / len(scores)


# ----------------------------------------------------------------------------- ANLS

ANLS_THRESHOLD = 0.5


def _levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """The best 1 - normalised edit distance over the reference answers; 0 when that distance
    is `threshold` or more (compared lower-cased, spaces collapsed)."""
    pred = " ".join(prediction.strip().lower().split())
    best = 0.0
    for answer in answers:
        ref = " ".join(answer.strip().lower().split())
        distance = _levenshtein(pred, ref) / max(len(pred), len(ref), 1)
        best = max(best, 1.0 - distance if distance < threshold else 0.0)
    return best


# ----------------------------------------------------------------------------- relaxed accuracy

RELAXED_TOLERANCE = 0.05


def _number(text: str) -> float | None:
    text = text.strip().rstrip("%").replace(",", "").strip()
    try:
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, target: str, tolerance: float = RELAXED_TOLERANCE) -> float:
    """ChartQA: a number within `tolerance` (relative) of a numeric target counts; otherwise the
    answer must match exactly (case-insensitive). A target of 0 needs exactly 0."""
    pred, ref = _number(prediction), _number(target)
    if pred is not None and ref is not None:
        return float(pred == ref if ref == 0 else abs(pred - ref) / abs(ref) <= tolerance)
    return float(prediction.strip().lower() == target.strip().lower())
