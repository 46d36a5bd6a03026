"""Answer extraction and math-equivalence scoring: the one correctness oracle for GRPO rewards and evaluation.

:func:`extract_answer` takes the final answer out of a completion (last ``\\boxed{}``, else last ``Answer:``
line, else optionally the last number). :func:`is_equivalent` decides equality: trivial cases (same string after
normalization; plain integers, decimals and simple fractions via :class:`fractions.Fraction`, agreeing with
math_verify's 6-decimal float rounding) in-process in microseconds; the rest with ``math_verify`` (``parse`` +
``verify``) in a worker subprocess (:mod:`pte.data.verifier`). :func:`score` and :func:`reward_fn` (TRL's
signature) combine the two.

Completions are untrusted. Nothing here evals them and the calling process never imports sympy; math_verify (which
may ``parse_expr`` digit-and-operator strings) runs only in the workers. Bounds, each giving None/False, never a hang:
only the last :data:`MAX_TEXT_CHARS` characters of a completion are searched (linear scans, no backtracking regex);
answers longer than :data:`MAX_ANSWER_CHARS` or nested deeper than :data:`MAX_NESTING` are not equivalent
(math_verify's LaTeX parser is exponential in nesting depth); each worker request has a wall-clock deadline
``timeout_s``, after which the worker is SIGKILLed and replaced (so ``10^{10^{10^{10}}}`` costs ``timeout_s``).
math_verify's own signal.alarm timeouts are off (they fail outside the main thread); ours work in any thread or
process. Start-up of a fresh worker (about 1 s of imports) is awaited separately, outside ``timeout_s``.

It does not know about datasets, prompts, tokenizers or training: gold answers are bare answer strings. It
implements no paper equation; it supplies the reward of the GRPO objective (paper Eq. 3). POSIX only.
"""

from __future__ import annotations

import functools
import re
from collections import deque
from fractions import Fraction
from itertools import accumulate
from typing import TYPE_CHECKING, Any

from pte.data.verifier import shutdown, verify

if TYPE_CHECKING:
    from pte.data.rows import DataConfig

__all__ = ["MAX_ANSWER_CHARS", "MAX_NESTING", "MAX_TEXT_CHARS", "char_match_reward", "extract_answer", "is_equivalent",
           "reward_fn", "reward_function", "score", "shutdown"]

MAX_TEXT_CHARS = 10_000  # only the last this-many characters of a completion are searched for an answer
MAX_ANSWER_CHARS = 1_000  # longer answers (predicted or gold) are never equivalent: guards sympy against giant inputs
MAX_NESTING = 8  # answers nested deeper in ([{ are never equivalent unless identical as strings

_FLOAT_DIGITS = 15  # math_verify compares floats as 15-significant-digit sympy Floats rounded to 6 places

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BOX_BARE_ARG_RE = re.compile(r"\s*([^\s${}]+)")
_ANSWER_LINE_RE = re.compile(r"(?i)\banswer\b\**[ \t]*(?:is[ \t]*)?[:\uff1a]([^\n]*)")
_LAST_NUMBER_RE = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?<![\w.])-?\.\d+")
_WRAPPER_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_SPACING_RE = re.compile(r"\\[,!;: ]|\\left(?![A-Za-z])|\\right(?![A-Za-z])|\s+")
_FRAC_RE = re.compile(r"\\frac(?:\{(\d+)\}\{(\d+)\}|(\d)(\d))|(\d+)/(\d+)")
_DECIMAL_RE = re.compile(r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+")


def _box_content(text: str, start: int) -> str | None:
    """Argument of the box command ending at ``start``: a brace-balanced group or one bare token; None if malformed."""
    i = start
    while i < len(text) and text[i].isspace():
        i += 1
    if i >= len(text) or text[i] != "{":
        bare = _BOX_BARE_ARG_RE.match(text, start)
        return bare.group(1) if bare else None
    depth, j = 0, i
    while j < len(text):
        if text[j] == "\\":
            j += 2  # an escaped brace such as \{ is content, not grouping
            continue
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
        j += 1
    return None


def _last_match(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    """The last non-overlapping match of ``pattern``, in one left-to-right scan."""
    found = deque(pattern.finditer(text), maxlen=1)
    return found[0] if found else None


def _clean(answer: str) -> str:
    """Strip whitespace, markdown bold, one trailing full stop and surrounding ``$``, ``\\(\\)``, ``\\[\\]``."""
    s = answer.strip()
    for _ in range(3):
        prev = s
        s = s.strip("* \t\n")
        s = s[:-1].rstrip() if s.endswith(".") and not s.endswith("..") else s
        if len(s) >= 2 and s[0] == s[-1] == "$" and "$" not in s.strip("$"):
            s = s.strip("$")
        if s[:2] + s[-2:] in ("\\(\\)", "\\[\\]"):
            s = s[2:-2]
        if s == prev:
            break
    return s.strip()


def extract_answer(text: str, *, allow_last_number: bool = False) -> str | None:
    """Extract the final answer from a completion.

    Order: (1) the LAST ``\\boxed{...}`` / ``\\fbox{...}`` (also ``\\boxed 3``), brace-balanced, escaped
    braces allowed; an unclosed or empty last box counts as no box. (2) The last ``Answer: ...`` /
    ``Final answer: ...`` line (case-insensitive), with surrounding ``$`` and a trailing ``.`` removed.
    (3) Only if ``allow_last_number``: the last number (``-1,234.5`` -> ``-1234.5``).
    Only the last :data:`MAX_TEXT_CHARS` characters are searched; every step is a single linear scan.

    Args:
        text: The completion (untrusted model output).
        allow_last_number: Fall back to the last number in the text when there is no box and no answer line.

    Returns:
        The answer string, or None when nothing is found.

    Example:
        >>> extract_answer(r"so $\\boxed{\\frac{1}{2}}$.")
        '\\\\frac{1}{2}'
        >>> extract_answer("Answer: $42$") , extract_answer("it is 1,234", allow_last_number=True)
        ('42', '1234')
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_answer expects a str completion, got {type(text).__name__}")
    text = text[-MAX_TEXT_CHARS:]
    box = _last_match(_BOX_RE, text)
    content = _clean(_box_content(text, box.end()) or "") if box else ""
    if content:
        return content
    line = _last_match(_ANSWER_LINE_RE, text)
    content = _clean(line.group(1)) if line else ""
    if content:
        return content
    number = _last_match(_LAST_NUMBER_RE, text) if allow_last_number else None
    return number.group(0).replace(",", "") if number else None


def _normalize(answer: str) -> str:
    """Canonical string for the exact-match fast path: no spacing, no \\left/\\right, \\dfrac -> \\frac."""
    s = _SPACING_RE.sub("", _WRAPPER_RE.sub(r"\1", answer))
    return s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")


def _as_number(s: str) -> tuple[Fraction, bool] | None:
    """A normalized plain number (integer, decimal, ``a/b``, ``\\frac{a}{b}``) as (value, exact), else None."""
    sign = -1 if s[:1] == "-" else 1
    s = s[1:] if s[:1] in "+-" else s
    frac = _FRAC_RE.fullmatch(s)
    if frac:
        num, den = (int(g) for g in frac.groups() if g is not None)
        return (Fraction(sign * num, den), True) if den else None
    if not _DECIMAL_RE.fullmatch(s):
        return None
    digits = s.replace(",", "")
    if "." in digits and len(digits.strip("0.").replace(".", "")) > _FLOAT_DIGITS:
        return None  # beyond a sympy Float's precision: let math_verify decide
    return sign * Fraction(digits.rstrip(".") or "0"), "." not in digits


def _compare_numbers(pred: str, gold: str) -> bool | None:
    """Decide plain-number comparisons as math_verify would, or None when not sure."""
    a, b = _as_number(pred), _as_number(gold)
    if a is None or b is None:
        return None
    if a[0] == b[0]:
        return True
    if a[1] and b[1]:
        return False
    # A float is involved and math_verify rounds to 6 decimals: only a clear gap is a sure "no".
    return False if abs(a[0] - b[0]) > Fraction(2, 10**6) else None


def _nesting(s: str) -> int:
    return max(accumulate((c in "([{") - (c in ")]}") for c in s), default=0)


def is_equivalent(predicted: str, gold: str, *, timeout_s: float = 2.0) -> bool:
    """Whether two answer strings are mathematically equivalent.

    In-process fast path first (normalized string equality; plain numbers compared as fractions); otherwise
    ``math_verify.parse`` + ``verify(gold, pred)`` in a worker subprocess, bounded by ``timeout_s`` wall-clock
    seconds (not counted: waiting for a fresh worker's start-up, or for a free worker when more threads than
    workers call at once). Safe to call from many threads at once.
    Answers over :data:`MAX_ANSWER_CHARS` characters or nested deeper than :data:`MAX_NESTING` are not equivalent.

    Args:
        predicted: The model's answer (untrusted), e.g. from :func:`extract_answer`.
        gold: The reference answer.
        timeout_s: Wall-clock bound on the math_verify work; on expiry the result is False.

    Returns:
        True if equivalent; False otherwise, including on timeout or parse failure.

    Example:
        >>> is_equivalent("0.5", "\\\\frac12"), is_equivalent("3", "3.01")
        (True, False)
    """
    if not (isinstance(predicted, str) and isinstance(gold, str)):
        raise TypeError(f"is_equivalent expects str, str; got {type(predicted).__name__}, {type(gold).__name__}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s={timeout_s!r} must be > 0 seconds; pass e.g. timeout_s=2.0")
    if len(predicted) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return False
    pred_clean, gold_clean = _clean(predicted), _clean(gold)
    pred_norm, gold_norm = _normalize(pred_clean), _normalize(gold_clean)
    if not pred_norm or not gold_norm:
        return False
    if pred_norm == gold_norm:
        return True
    decided = _compare_numbers(pred_norm, gold_norm)
    if decided is not None:
        return decided
    if max(_nesting(pred_norm), _nesting(gold_norm)) > MAX_NESTING:
        return False
    return verify(pred_clean, gold_clean, timeout_s)


def score(completion: str, gold: str, *, allow_last_number: bool = False, timeout_s: float = 2.0) -> float:
    """1.0 if the answer extracted from ``completion`` is equivalent to ``gold``, else 0.0.

    Args:
        completion: The model's full completion text.
        gold: The reference answer (a bare answer, not a worked solution).
        allow_last_number: See :func:`extract_answer`.
        timeout_s: See :func:`is_equivalent`.

    Returns:
        1.0 or 0.0 (0.0 when no answer can be extracted).
    """
    answer = extract_answer(completion, allow_last_number=allow_last_number)
    return 1.0 if answer is not None and is_equivalent(answer, gold, timeout_s=timeout_s) else 0.0


def _completion_text(completion: Any) -> str:
    """TRL passes strings, or for conversational data a list of message dicts (the last one is the reply)."""
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        completion = completion[-1].get("content")
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str or a list of chat messages, got {type(completion).__name__}")
    return completion


def reward_fn(
    completions: list[Any], answer: list[Any], *, allow_last_number: bool = False, timeout_s: float = 2.0, **kwargs: Any
) -> list[float]:
    """Accuracy reward with TRL's reward-function signature ``f(completions, answer, **kw) -> list[float]``.

    Args:
        completions: B completions, each a string or a list of chat messages (the last one is scored).
        answer: B gold answers (the dataset's ``answer`` column); non-strings are converted with ``str``.
        allow_last_number: See :func:`extract_answer`.
        timeout_s: See :func:`is_equivalent`.
        **kwargs: Other dataset columns and the trainer state that TRL passes; ignored.

    Returns:
        B rewards in {0.0, 1.0}.

    Example:
        >>> reward_fn([r"... so \\boxed{\\frac{1}{2}}", "Answer: 7", "no idea"], ["0.5", "8", "1"])
        [1.0, 0.0, 0.0]
    """
    if len(completions) != len(answer):
        raise ValueError(f"reward_fn got {len(completions)} completions but {len(answer)} answers; pass one each")
    return [
        score(_completion_text(c), str(a), allow_last_number=allow_last_number, timeout_s=timeout_s)
        for c, a in zip(completions, answer, strict=True)
    ]


def char_match_reward(completions: list[str], answers: list[str]) -> list[float]:
    """Toy dense reward for smoke tests: the fraction of a completion's characters that occur in the answer."""
    pairs = zip(completions, answers, strict=True)
    return [sum(ch in a for ch in c) / len(c) if c and a else 0.0 for c, a in pairs]


def reward_function(cfg, data: DataConfig) -> Any:
    """The reward ``train.grpo.reward`` names (``cfg``: a :class:`pte.config.GRPOConfig`), under the answer oracle of
    ``data`` (``data.allow_last_number``): ``(completions, answers) -> rewards``."""
    if cfg.reward == "char_match":
        return char_match_reward
    return functools.partial(reward_fn, allow_last_number=data.allow_last_number)
