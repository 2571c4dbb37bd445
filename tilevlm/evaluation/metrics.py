"""The metrics small-VLM papers report, each a pure function of (prediction, reference), scored
the way lmms-eval 0.7.3 scores them.

- `exact_match`: tilevlm's own quiz (case, spaces and a final period do not count).
- `choice_letter` + `multiple_choice`: tilevlm's own reading of an option letter in free text,
  for the generic `multiple_choice` task.
- `vqa_accuracy`: VQAv2 / TextVQA's accuracy over 10 human answers, min(1, matches / 3) averaged
  over the 10 leave-one-out subsets, after VQAv2's (`normalize_vqa`) or TextVQA's
  (`normalize_textvqa`) answer normalisation.
- `anls`: DocVQA's average normalised Levenshtein similarity (0 below the 0.5 threshold).
- `relaxed_accuracy`: ChartQA's (numbers within 5 % of the target count, else exact match).

`LMMS_EVAL` names, per lmms-eval task, the whole chain lmms-eval runs from a model's raw text to
the number: its filters, the reasoning blocks its CLI strips, the strip every generated answer
gets, the task's answer parser and its metric. `tilevlm/evaluation/tasks.py` picks one per task
(`Task.scorer`); `tests/test_metrics_lmms_eval.py` compares each with lmms-eval's own functions.
"""

from __future__ import annotations

import re
import statistics
import string
from collections.abc import Callable, Sequence


def normalize_answer(text: str) -> str:
    """Case, surrounding whitespace, inner runs of spaces and a final period do not count."""
    return " ".join(text.strip().lower().split()).rstrip(".").strip()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


# ----------------------------------------------------------------------------- the response

# lmms-eval's CLI default `--reasoning_tags`: these blocks leave every answer before scoring.
REASONING_TAGS = (("<think>", "</think>"), ("<analysis>", "</analysis>"))


def strip_reasoning(text: str) -> str:
    """The answer without its reasoning blocks, stripped (lmms_eval.api.reasoning.
    strip_reasoning_tags): each `<think>...</think>` is cut out, first to last; an unclosed
    opening tag stays; a closing tag with no opening one keeps only what follows the last."""
    for start, end in REASONING_TAGS:
        while start in text and end in text:
            opened = text.find(start)
            closed = text.find(end, opened)
            if closed < 0:  # the only closing tag comes before the opening one
                break
            text = text[:opened] + text[closed + len(end):]
        if end in text and start not in text:  # the opening tag was in the prompt
            text = text.rsplit(end, 1)[-1]
    return text.strip()


def lmms_eval_response(text: str) -> str:
    """What a `generate_until` task's `process_results` receives from lmms-eval's CLI: the
    reasoning stripped (evaluator), then `.strip()` (ConfigurableTask.process_results)."""
    return strip_reasoning(text).strip()


# ----------------------------------------------------------------------------- multiple choice

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_PHRASES = ("the correct answer is", "the answer is", "correct answer is", "answer is",
            "the correct option is", "option", "answer:", "answer")


def choice_letter(prediction: str, n_choices: int) -> str | None:
    """The option letter a free-text answer names (A, B, ... of `n_choices`), or None.

    tilevlm's own reading, for the generic `multiple_choice` task (lmms-eval's tasks each have
    their own: `mmstar_letter`, `ai2d_correct`, `scienceqa_correct`). In order: the whole answer
    is a letter; it opens with one ("B", "(B)", "B.", "b) red", "B: red"); an answer phrase names
    one ("The answer is (B).", "Answer: c"); a "(B)" anywhere.
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


# MMStar: lmms_eval.tasks._task_utils.mcq_extract.extract_mcq_answer. Each letter is looked for
# in several shapes; the shape of highest rank wins, and within it the latest position.
_MCQ_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is",
    "the best answer is", "best answer is", "the correct option is", "correct option is",
    "the best option is", "best option is", "the choice is", "choice is", "the correct choice is",
    "correct choice is", "i choose", "i select", "i pick", "my answer is", "my choice is",
    "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは",
)
_MCQ_SHAPES = (("({})", 6), ("{}.", 5), ("{}:", 4), ("{})", 3), ("{} ", 2))  # (shape, rank)
_MCQ_PHRASE, _MCQ_START, _MCQ_END = 7, 10, 9


def mmstar_letter(response: str, choices: str = "ABCD") -> str:
    """The letter lmms-eval's `extract_mcq_answer` reads from an answer, or "" (upper-case
    letters only: "option b" names none).

    Ranked: the answer opens with the letter ("B", "B, red") > ends with it ("... is B") > an
    answer phrase ("The answer is", "I choose", ...) followed anywhere by it > "(B)" > "B." >
    "B:" > "B)" > "B " > (only when nothing else matched) the letter anywhere ("Definitely" reads
    D). Before looking, the ends lose whitespace, then , . ! ? ; : ' " in that order, once each.
    """
    if not response.strip():
        return ""
    text = response.strip()
    for mark in ",.!?;:'\"":
        text = text.strip(mark)
    text = f" {text} "  # a letter can then sit next to a space at either end
    found: list[tuple[int, int, str]] = []  # (rank, position, letter)
    for letter in choices:
        for shape, rank in _MCQ_SHAPES:
            at = text.rfind(shape.format(letter))
            if at >= 0:
                found.append((rank, at, letter))
    lower = text.lower()  # the phrase is found here, its letter (upper case) in `text`
    for phrase in _MCQ_PHRASES:
        at = lower.find(phrase)
        if at >= 0:
            for letter in choices:
                where = text.find(letter, at + len(phrase))
                if where >= 0:
                    found.append((_MCQ_PHRASE, where, letter))
    core = text.strip()
    for letter in choices:
        alone = len(core) == 1
        if core.startswith(letter) and (alone or not core[1].isalpha()):
            found.append((_MCQ_START, 0, letter))
        if core.endswith(letter) and (alone or not core[-2].isalpha()):
            found.append((_MCQ_END, len(text) - 1, letter))
    if not found:
        found = [(0, text.rfind(letter), letter) for letter in choices if letter in text]
    return max(found)[2] if found else ""


def mmstar_correct(prediction: str, answer_letter: str) -> float:
    """lmms_eval.tasks.mmstar.utils.mmstar_process_results: the letter of A-D against the
    answer (stripped, upper case)."""
    return float(mmstar_letter(lmms_eval_response(prediction)) == answer_letter.strip().upper())


_AI2D_LETTER = re.compile(r"^\s*([A-Z])\.")  # ai2d.yaml's MultiChoiceRegexFilter
_PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)


def _hf_exact_match_form(text: str) -> str:
    """lmms_eval.api.metrics.exact_match_hf_evaluate with ignore_case and ignore_punctuation, on
    numpy strings: lower-cased one character at a time (numpy's `char.lower`: "ΣΑΣ" -> "σασ",
    "İ" -> "i"), ASCII punctuation dropped, trailing NUL characters dropped (numpy's fixed-width
    strings cannot hold them)."""
    lowered = "".join(c.lower()[0] for c in text)
    return lowered.translate(_PUNCTUATION_TABLE).rstrip("\x00")


def ai2d_correct(prediction: str, answer_letter: str) -> float:
    """AI2D in lmms-eval (ai2d.yaml): the raw answer becomes its letter when it opens with an
    upper-case "B." (MultiChoiceRegexFilter), else stays whole; then the reasoning and the ends
    are stripped, and the exact match ignores case and ASCII punctuation ("(b)" and "**B**"
    count, "B) red" does not)."""
    opened = _AI2D_LETTER.match(prediction)
    answer = lmms_eval_response(opened.group(1) if opened else prediction)
    return float(_hf_exact_match_form(answer) == _hf_exact_match_form(answer_letter))


def scienceqa_correct(prediction: str, answer_letter: str) -> float:
    """lmms_eval.tasks.scienceqa.utils.sqa_process_results: the answer is the letter (any case),
    or opens with an upper-case letter and a period ("B. red")."""
    answer, target = lmms_eval_response(prediction), answer_letter.strip().lower()
    if answer.lower() == target:
        return 1.0
    if len(answer) >= 2 and answer[0].isupper() and answer[1] == ".":
        return float(answer[0].lower() == target)
    return 0.0


# ----------------------------------------------------------------------------- VQA accuracy

# lmms_eval.tasks._task_utils.vqa_eval_metric.EvalAIAnswerProcessor's tables (those of the
# official VQA evaluation). Its keys with a capital ("Im", "Ive", "Id've", ...) never match a
# lower-cased word, so they are left out; "somebody'd" -> "somebodyd" is the table's own.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't",
    "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_VQA_PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!"
_PERIOD = re.compile(r"\.(?!\d)")  # a period not before a digit
_COMMA_NUMBER = re.compile(r"(?<=\d),+(?=\d)")
# EvalAIAnswerProcessor passes re.UNICODE (32) where `Pattern.sub` takes its count: only the
# first 32 such periods go.
_PERIODS_REMOVED = 32


def _vqa_punctuation(text: str) -> str:
    """EvalAIAnswerProcessor.process_punctuation: each mark is dropped where it touches a space
    in `text` (or anywhere, when `text` has a comma inside a number), else made a space; then
    periods not before a digit go."""
    out, digits_comma = text, _COMMA_NUMBER.search(text) is not None
    for mark in _VQA_PUNCTUATION:
        dropped = digits_comma or f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if dropped else " ")
    return _PERIOD.sub("", out, count=_PERIODS_REMOVED)


def _vqa_words(text: str) -> str:
    """EvalAIAnswerProcessor.process_digit_article: lower case; number words as digits; articles
    dropped; contractions restored."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_vqa(answer: str) -> str:
    """VQAv2's normalisation in lmms-eval (vqav2.utils.vqav2_process_results): tabs and newlines
    as spaces, stripped, then punctuation and words as the VQA challenge does."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _vqa_words(_vqa_punctuation(text))


def normalize_textvqa(answer: str) -> str:
    """TextVQA's in lmms-eval (textvqa.utils.textvqa_process_results, EvalAIAnswerProcessor's
    call): first lower case, commas and question marks deleted, "'s" split off as " 's"; then
    VQAv2's. "a,b" is "ab" here and "b" there."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return normalize_vqa(text)


def vqa_accuracy(prediction: str, answers: Sequence[str],
                 normalize: Callable[[str], str] = normalize_vqa) -> float:
    """min(1, humans who gave the prediction / 3), averaged over the leave-one-out subsets (the
    mean as `statistics.mean` takes it, as lmms-eval does)."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize(prediction)
    refs = [normalize(a) for a in answers]
    return statistics.mean(min(1, sum(r == pred for j, r in enumerate(refs) if j != i) / 3)
                           for i in range(len(refs)))


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
    """lmms_eval.api.metrics.anls: 1 - the smallest normalised edit distance over the answers, 0
    when that similarity is below `threshold` (exactly 0.5 counts).

    The distance is taken between the texts lower-cased with whitespace collapsed, but divided
    by the longer RAW length (as upper-cased: "ß" counts 2) -- so surrounding spaces make a
    distance smaller; a pair of empty texts is distance 0."""
    if not answers:
        raise ValueError("anls needs at least one reference answer")
    pred = " ".join(prediction.strip().lower().split())
    distances = []
    for answer in answers:
        ref = " ".join(answer.strip().lower().split())
        longest = max(len(answer.upper()), len(prediction.upper()))
        distances.append(_levenshtein(pred, ref) / longest if longest else 0.0)
    similarity = 1 - min(distances)
    return similarity if similarity >= threshold else 0.0


# ----------------------------------------------------------------------------- relaxed accuracy

RELAXED_TOLERANCE = 0.05


def _chart_number(text: str) -> float | None:
    """chartqa.utils.relaxed_correctness's `_to_float`: Python's float(), "12%" as 0.12; no
    thousands separators ("1,000" is text), surrounding whitespace allowed."""
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, target: str, tolerance: float = RELAXED_TOLERANCE) -> float:
    """ChartQA (lmms_eval.tasks.chartqa.utils.relaxed_correctness): a number within `tolerance`
    (relative) of a numeric, non-zero target counts; anything else, a target of 0 included, must
    match as text, ignoring case only ("0.0" is not "0")."""
    pred, ref = _chart_number(prediction), _chart_number(target)
    if pred is not None and ref:
        return float(abs(pred - ref) / abs(ref) <= tolerance)
    return float(prediction.lower() == target.lower())


# ----------------------------------------------------------------------------- lmms-eval tasks

def _vqav2(prediction: str, answers: Sequence[str]) -> float:
    return vqa_accuracy(lmms_eval_response(prediction), answers, normalize_vqa)


def _textvqa(prediction: str, answers: Sequence[str]) -> float:
    return vqa_accuracy(lmms_eval_response(prediction), answers, normalize_textvqa)


def _docvqa(prediction: str, answers: Sequence[str]) -> float:
    return anls(lmms_eval_response(prediction), answers)


def _chartqa(prediction: str, target: str) -> float:
    return relaxed_accuracy(lmms_eval_response(prediction), target)


# name -> (the Task.metric it scores, (raw prediction, the sample's reference) -> score)
LMMS_EVAL: dict[str, tuple[str, Callable[..., float]]] = {
    "vqav2": ("vqa_accuracy", _vqav2),
    "textvqa": ("vqa_accuracy", _textvqa),
    "docvqa": ("anls", _docvqa),
    "chartqa": ("relaxed_accuracy", _chartqa),
    "mmstar": ("multiple_choice", mmstar_correct),
    "ai2d": ("multiple_choice", ai2d_correct),
    "scienceqa": ("multiple_choice", scienceqa_correct),
}


def lmms_eval_score(scorer: str, prediction: str, reference: str | Sequence[str]) -> float:
    """lmms-eval task `scorer`'s score of a model's raw answer (`LMMS_EVAL`)."""
    return LMMS_EVAL[scorer][1](prediction, reference)
