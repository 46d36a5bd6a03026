"""Tests for pte.data.rewards: extraction, equivalence, time bounds under adversarial input, threads, no code execution.

Every expected value in the tables was checked by hand (and against math_verify 0.9.0's actual behaviour where the
answer is a matter of convention: such rows carry a "math_verify:" note).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

import doctest  # noqa: E402
import multiprocessing  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from pte.data import rewards, verifier  # noqa: E402
from pte.data.rewards import extract_answer, is_equivalent, reward_fn, score  # noqa: E402

TIMEOUT_S = 2.0
MARGIN_S = 1.0  # for pipes and scheduling; start-up of a worker is excluded by the warm pool
PATHOLOGICAL_BOUND_S = 3.0

# (completion, gold, allow_last_number, expected score)
CASES: list[tuple[str, str, bool, float]] = [
    # equivalent forms
    (r"The answer is $\boxed{\frac{1}{2}}$.", "0.5", False, 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", False, 1.0),
    (r"\boxed{\frac12}", "1/2", False, 1.0),
    (r"\boxed{\dfrac{1}{2}}", "0.5", False, 1.0),
    (r"\boxed{\tfrac34}", r"\dfrac{3}{4}", False, 1.0),
    (r"\boxed{2/4}", r"\frac{1}{2}", False, 1.0),
    (r"\boxed{5.0}", "5", False, 1.0),
    (r"\boxed{1,234}", "1234", False, 1.0),
    (r"\boxed{-\frac{1}{2}}", "-0.5", False, 1.0),
    (r"\boxed{\frac{-1}{2}}", "-0.5", False, 1.0),
    (r"\boxed{(x+1)^2}", "x^2+2x+1", False, 1.0),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", False, 1.0),
    (r"\boxed{\frac{1}{2}\sqrt{3}}", r"\frac{\sqrt{3}}{2}", False, 1.0),
    (r"\boxed{\{2,1\}}", r"\{1,2\}", False, 1.0),
    (r"\boxed{(1, 2]}", "(1,2]", False, 1.0),
    (r"\boxed{\left[1,2\right)}", "[1,2)", False, 1.0),
    (r"\boxed{(-\infty,3)}", r"(-\infty, 3)", False, 1.0),
    (r"\boxed{0.333333}", r"\frac{1}{3}", False, 1.0),  # math_verify: floats compared at 6 decimals
    (r"\boxed{6.283185}", r"2\pi", False, 1.0),
    (r"\boxed{x=3}", "3", False, 1.0),
    (r"\boxed{10\text{ cm}}", "10", False, 1.0),
    (r"\boxed{\text{(A)}}", "A", False, 1.0),
    (r"\boxed{3i+2}", "2+3i", False, 1.0),
    (r"\boxed{\log_2 8}", "3", False, 1.0),
    (r"\boxed{\binom{5}{2}}", "10", False, 1.0),
    (r"\boxed{\sin^2 x + \cos^2 x}", "1", False, 1.0),
    (r"\boxed{50\%}", "50", False, 1.0),  # math_verify: "9%" == 9 (percent dropped for integers)
    (r"$\boxed{\begin{pmatrix}1\\2\end{pmatrix}}$", r"\begin{pmatrix}1\\2\end{pmatrix}", False, 1.0),
    (r"\boxed 7", "7", False, 1.0),
    (r"\fbox{12}", "12", False, 1.0),
    # near misses
    (r"\boxed{3.01}", "3", False, 0.0),
    (r"\boxed{\frac{1}{3}}", r"\frac{1}{2}", False, 0.0),
    (r"\boxed{x-1}", "x+1", False, 0.0),
    (r"\boxed{0.3333}", "1/3", False, 0.0),
    (r"\boxed{[1,2)}", "(1,2]", False, 0.0),
    (r"\boxed{(2,1)}", "(1,2)", False, 0.0),
    (r"\boxed{\infty}", r"-\infty", False, 0.0),
    (r"\boxed{3.14159}", r"\pi", False, 0.0),  # 3.14159 vs 3.141593 at 6 decimals
    (r"\boxed{1e3}", "1000", False, 0.0),  # math_verify: scientific notation is not a number in LaTeX
    (r"\boxed{0.5}", r"50\%", False, 0.0),  # math_verify: 50% is not 0.5
    (r"\boxed{B}", "A", False, 0.0),
    (r"\boxed{\begin{pmatrix}1\\3\end{pmatrix}}", r"\begin{pmatrix}1\\2\end{pmatrix}", False, 0.0),
    (r"\boxed{1235}", "1,234", False, 0.0),
    # malformed
    (r"so the answer is \boxed{42", "42", False, 0.0),
    (r"so the answer is \boxed{42", "42", True, 1.0),  # unclosed box: falls through to the last number
    (r"\boxed{}", "0", False, 0.0),
    (r"\boxed{ }", "0", True, 0.0),
    ("no answer here", "5", False, 0.0),
    ("", "5", True, 0.0),
    (r"\boxed{\frac{1}{0}}", "0", False, 0.0),
    # nested and multiple boxes
    (r"\boxed{\boxed{7}}", "7", False, 1.0),
    (r"\boxed{\frac{\frac{1}{2}}{2}}", "1/4", False, 1.0),
    (r"first \boxed{3}, corrected: \boxed{4}", "4", False, 1.0),
    (r"first \boxed{3}, corrected: \boxed{4}", "3", False, 0.0),
    (r"\boxed{5} and then \boxed{", "5", False, 0.0),  # the last box decides, even when broken
    # answer lines
    ("reasoning...\nAnswer: 42", "42", False, 1.0),
    ("Answer: 41\nwait, no.\nAnswer: $42$.", "42", False, 1.0),
    (r"FINAL ANSWER: \frac{3}{4}", "0.75", False, 1.0),
    ("**Answer:** 12", "12", False, 1.0),
    ("Answer: 12\n" + r"\boxed{13}", "13", False, 1.0),  # a box beats an answer line
    ("Final Answer: The final answer is $5$. I hope it is correct.", "5", False, 1.0),
    ("Answer: 42 apples", "42", False, 1.0),
    # last-number fallback
    ("So she has 1,234 apples", "1234", False, 0.0),
    ("So she has 1,234 apples", "1234", True, 1.0),
    ("the difference is 10-5 = 5", "5", True, 1.0),
    ("the temperature is -3.5 degrees", "-3.5", True, 1.0),
    ("It is 7. Then 8.", "8", True, 1.0),
    ("It is 7. Then 8.", "7", True, 0.0),
    # adversarial
    (r"\boxed{__import__('os').system('echo pwned')}", "0", False, 0.0),
    ("\\boxed{" + "\\frac{" * 5000 + "}", "1", False, 0.0),
    ("\\boxed{" + "9" * 100_000 + "}", "9", True, 0.0),  # last 10k chars: no box; a 9999-digit number is too long
    ("(" * 1000 + ")" * 1000, "1", True, 0.0),
    (r"\boxed{" + "(" * 12 + "1" + ")" * 12 + "}", "1", False, 0.0),  # nesting cap
    (r"\boxed{x}" * 3000, "x", False, 1.0),  # the last box survives the 10k-character cap
    ("Answer: " + "1" * 2000, "1", False, 0.0),  # answer-length cap
    (r"\boxed{9**9**9**9}", "1", False, 0.0),
]


@pytest.fixture(scope="module", autouse=True)
def warm_pool() -> None:
    """Start one worker before timed tests (its ~1 s start-up is deliberately outside ``timeout_s``)."""
    assert is_equivalent("x+1", "1+x")


def test_table_is_large() -> None:
    assert len(CASES) >= 50


@pytest.mark.parametrize(("completion", "gold", "allow_last_number", "expected"), CASES)
def test_score_table(completion: str, gold: str, allow_last_number: bool, expected: float) -> None:
    start = time.monotonic()
    got = score(completion, gold, allow_last_number=allow_last_number, timeout_s=TIMEOUT_S)
    elapsed = time.monotonic() - start
    assert got == expected
    assert elapsed < TIMEOUT_S + MARGIN_S, f"took {elapsed:.2f} s"


@pytest.mark.parametrize(
    ("text", "allow_last_number", "expected"),
    [
        (r"so $\boxed{\frac{1}{2}}$.", False, r"\frac{1}{2}"),
        (r"\boxed{\{1,2\}}", False, r"\{1,2\}"),
        (r"\boxed 3.", False, "3"),
        (r"\boxed{ \dfrac{3}{4} }", False, r"\dfrac{3}{4}"),
        (r"\boxed{a\\}", False, r"a\\"),
        (r"\boxedfoo{3}", False, None),
        (r"\boxed{\text{yes}}", False, r"\text{yes}"),
        ("Final answer: $x^2$.", False, "x^2"),
        ("answer: \\(7\\)", False, "7"),
        ("Answer:\n7", True, "7"),  # an empty answer line is no answer: the last number is used
        ("total -1,234.5 units", True, "-1234.5"),
        ("pi is .5", True, ".5"),
        ("1,2345", True, "2345"),
        ("no digits", True, None),
        ("7 apples", False, None),
        (r"\boxed{", True, None),
    ],
)
def test_extract_answer(text: str, allow_last_number: bool, expected: str | None) -> None:
    assert extract_answer(text, allow_last_number=allow_last_number) == expected


@pytest.mark.parametrize(
    "text",
    ["\\boxed{" * 200_000, "Answer:" * 200_000, "1," * 500_000, "{" * 1_000_000, "\\" * 1_000_000, "-" * 1_000_000,
     "1^" * 500_000 + "9", " " * 1_000_000 + "Answer: 5"],
)
def test_extract_answer_is_linear_time(text: str) -> None:
    start = time.monotonic()
    extract_answer(text, allow_last_number=True)
    assert time.monotonic() - start < 0.5


@pytest.mark.parametrize(
    ("pred", "gold", "expected"),
    [
        ("3", "3", True),
        (" $3$ ", "3.", True),
        ("007", "7", True),
        ("+5", "5", True),
        ("-0", "0", True),
        ("1/1000000000000000000000", "0", False),
        ("123456789012345678", "123456789012345679", False),
        (r"\frac{1}{2}", r"\dfrac{1}{2}", True),
        ("0.5", "1/2", True),
        ("3", "3.0000001", False),  # math_verify: no 6-decimal tolerance against an integer (sympy Float != Integer)
        ("", "0", False),
        ("5", "", False),
        (r"\$5", "5", True),
        (r"\text{yes}", "yes", True),
    ],
)
def test_is_equivalent_edges(pred: str, gold: str, expected: bool) -> None:
    assert is_equivalent(pred, gold) is expected


def test_invalid_arguments_raise() -> None:
    with pytest.raises(TypeError):
        is_equivalent(3, "3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout_s"):
        is_equivalent("1", "x", timeout_s=0)
    with pytest.raises(ValueError, match="completions"):
        reward_fn(["a"], ["1", "2"])


@pytest.mark.parametrize(
    "answer",
    [
        "\\frac{" * 5000,
        "9" * 100_000,
        "(((((1)))))" * 20,
        "1^" * 1000 + "9",
        "1^" * 400 + "9",
        r"10^{10^{10^{10}}}",
        r"(10^{10})!",
    ],
)
def test_pathological_inputs_are_bounded_and_pool_recovers(answer: str) -> None:
    calls = [
        (TIMEOUT_S, lambda: score(f"\\boxed{{{answer}}}", "5", timeout_s=TIMEOUT_S)),
        (1.0, lambda: is_equivalent(answer, "5", timeout_s=1.0)),
    ]
    for timeout_s, call in calls:
        start = time.monotonic()
        assert not call()
        elapsed = time.monotonic() - start
        assert elapsed < min(PATHOLOGICAL_BOUND_S, timeout_s + MARGIN_S), f"took {elapsed:.2f} s"
        # right after a timeout (the stuck worker was killed), a normal case that needs sympy still scores 1.0
        assert score(r"\boxed{(x+1)^2}", "x^2+2x+1") == 1.0


def test_timeout_kills_the_worker_and_returns_within_bound() -> None:
    pool = verifier._get_pool()
    before = {id(w) for w in pool.idle}
    start = time.monotonic()
    assert is_equivalent(r"2^{2^{2^{2^{2^{2}}}}}", "5", timeout_s=1.0) is False
    elapsed = time.monotonic() - start
    assert 0.9 < elapsed < 1.0 + MARGIN_S
    assert any(id(w) not in before and w.proc.poll() is None for w in pool.idle), "no replacement worker started"
    assert is_equivalent(r"\sqrt{8}", r"2\sqrt{2}") is True


THREAD_CASES = [(c, g, a) for c, g, a, _ in CASES if len(c) < 200]


def test_threads_agree_with_sequential() -> None:
    sequential = [score(c, g, allow_last_number=a) for c, g, a in THREAD_CASES]
    results: dict[int, list[float]] = {}
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            if k == 0:  # a worker is killed at its deadline while the other threads are using theirs
                assert score(r"\boxed{10^{10^{10^{10}}}}", "1", timeout_s=1.0) == 0.0
            order = THREAD_CASES if k % 2 == 0 else THREAD_CASES[::-1]  # threads hit different cases at once
            got = [score(c, g, allow_last_number=a) for c, g, a in order]
            results[k] = got if k % 2 == 0 else got[::-1]
        except BaseException as exc:  # re-raised in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert sorted(results) == [0, 1, 2, 3]
    for got in results.values():
        assert got == sequential


def test_reward_fn_formats() -> None:
    completions = [r"so \boxed{4}", [{"role": "assistant", "content": "Answer: 5"}], "nothing"]
    assert reward_fn(completions, ["4", 5, "1"], prompts=["p"] * 3, trainer_state=None) == [1.0, 1.0, 0.0]
    assert reward_fn(["it is 6"], ["6"], allow_last_number=True) == [1.0]


def test_docstring_examples() -> None:
    failures, tried = doctest.testmod(rewards, verbose=False)
    assert tried >= 3 and failures == 0


def test_never_executes_model_output(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    pwned_pte = Path("/tmp/pwned_pte")
    existed = pwned_pte.exists()
    payloads = [
        f"__import__('os').system('touch {marker}')",
        "__import__('os').system('touch /tmp/pwned_pte')",
        f"exec(\"open('{marker}', 'w')\")",
        f"eval(\"open('{marker}', 'w')\")",
        f"().__class__.__base__.__subclasses__()[0]; open('{marker}', 'w')",
    ]
    for payload in payloads:
        assert extract_answer(rf"\boxed{{{payload}}}") == payload
        assert score(rf"\boxed{{{payload}}}", "0") == 0.0
        assert score(f"Answer: {payload}", "0") == 0.0
        assert is_equivalent(payload, "1") is False
    assert not marker.exists()
    assert pwned_pte.exists() == existed


def test_caller_never_imports_sympy() -> None:
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('r', {rewards.__file__!r})\n"
        "r = importlib.util.module_from_spec(spec); spec.loader.exec_module(r)\n"
        "assert r.score(r'\\boxed{1/2}', '0.5') == 1.0 and r.is_equivalent('x+1', '1+x')\n"
        "assert 'sympy' not in sys.modules and 'math_verify' not in sys.modules, 'sympy leaked into the caller'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _score_in_child(queue: multiprocessing.Queue) -> None:
    queue.put((score(r"\boxed{(x+1)^2}", "x^2+2x+1"), score(r"\boxed{3}", "3")))


def test_forked_child_gets_its_own_workers() -> None:
    assert is_equivalent("x^2", "x \\cdot x")  # the parent has a warm pool at fork time
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_score_in_child, args=(queue,))
    child.start()
    assert queue.get(timeout=120) == (1.0, 1.0)
    child.join(timeout=30)
    assert child.exitcode == 0
    assert is_equivalent(r"\sqrt{8}", r"2\sqrt{2}")  # the parent's pool is untouched


def test_shutdown_then_reuse() -> None:
    verifier.shutdown()
    assert is_equivalent(r"\sqrt{8}", r"2\sqrt{2}")
