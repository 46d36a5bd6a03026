"""Our own seeded task family ``var_chain`` and worked solutions written by program.

``var_chain`` is the offline task on which a bounded cache hurts (docs/evaluation.md, "The cpu-demo task"). A
problem is a short straight-line program over single-digit values; the answer is the value of its last variable::

    Run the program and give the final value of h.
    a=9-4
    b=8-a
    c=b+1
    ...
    g=f-6
    h=g+c

Most statements use the previous variable and a constant, but the last ``recall`` statements also use an *early*
variable, at least ``min_gap`` statements back and at least ``min_depth`` statements deep (``c`` above). The
worked solution (:func:`worked_solution`) evaluates one statement per line, substituting the values it recalls from
its own earlier lines::

    a=9-4=5
    b=8-a=8-5=3
    ...
    g=f-6=8-6=2
    h=g+c=2+4=6
    \\boxed{6}

Why it needs memory: the value of an early variable exists only in the thinking (the prompt holds the program, not
its values), and it is the end of a chain of ``>= min_depth`` dependent statements, so re-deriving it from the
prompt means re-running that chain (``min_depth`` lines, about as long as the demo's whole thinking window). A line
is about 12 tokens, so with ``min_gap = 4`` the recalled value lies 40-55 thinking tokens back: beyond a 32-token
thinking window it has been evicted when it is needed, and the final value becomes a guess (one in seven to ten),
unless the evicted thoughts were encoded somewhere (PTE's state).
Every value and constant is a single digit and every result stays in 0..9, so the arithmetic itself is one-digit
facts that a 135M model learns quickly; the difficulty is remembering, not computing.

Item ``i`` of seed ``s`` comes from ``random.Random("var_chain:s:i")``: independent of the size and of other items,
and identical on every platform and Python version.

:func:`worked_solution` also solves ``reasoning_gym:chain_sum`` rows (running partial sums), so the warm start can
mix both offline families.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass

__all__ = ["TASKS", "Recall", "VarChainConfig", "evaluate_program", "recall_score", "recall_spans", "recalls",
           "var_chain",
           "worked_solution", "worked_solutions"]

_HEADER = "Run the program and give the final value of {var}."
_STATEMENT_RE = re.compile(r"^([a-z])=([a-z0-9])([+-])([a-z0-9])$")
_CHAIN_SUM_RE = re.compile(r"^State the final answer to the following arithmetic problem: (.+) =$")


@dataclass(frozen=True)
class VarChainConfig:
    """Settings of ``var_chain`` (``data.*[i].kwargs`` of a ``var_chain`` source)."""

    steps: int = 8
    """Statements per program (2..26), one variable each, named a, b, c, ..."""
    recall: int = 1
    """How many final statements use an early variable (>= ``min_gap`` statements back) besides the previous one."""
    min_gap: int = 4
    """Minimum distance, in statements, between a recalling statement and the variable it recalls."""
    min_depth: int = 3
    """The recalled variable is statement ``min_depth`` or later: its value is the end of that many dependent steps."""

    def __post_init__(self) -> None:
        if not 2 <= self.steps <= 26:
            raise ValueError(f"var_chain: steps = {self.steps!r} is invalid; allowed: 2..26 (one letter each).")
        if self.min_gap < 2:
            raise ValueError(f"var_chain: min_gap = {self.min_gap!r} is invalid; allowed: >= 2 (1 is the previous "
                             "variable, which every statement uses anyway).")
        if self.recall < 0 or self.min_depth < 1:
            raise ValueError(f"var_chain: recall = {self.recall!r} and min_depth = {self.min_depth!r} are invalid; "
                             "allowed: recall >= 0, min_depth >= 1.")
        need = self.recall + self.min_gap + self.min_depth - 1
        if self.steps < need:
            raise ValueError(f"var_chain: steps = {self.steps} is too few for recall = {self.recall}, min_gap = "
                             f"{self.min_gap} and min_depth = {self.min_depth}; allowed: steps >= recall + min_gap + "
                             f"min_depth - 1 = {need} (a recalled variable is >= min_depth deep and >= min_gap back).")


def _combine(rng: random.Random, x: str, y: str, vx: int, vy: int) -> tuple[str, int]:
    """A statement body over operands ``x`` (value ``vx``) and ``y`` (``vy``) whose result stays in 0..9."""
    options = []
    if vx + vy <= 9:
        options.append((f"{x}+{y}", vx + vy))
    if vx >= vy:
        options.append((f"{x}-{y}", vx - vy))
    if vy > vx:
        options.append((f"{y}-{x}", vy - vx))
    return rng.choice(options)


def var_chain(cfg: VarChainConfig, seed: int, index: int) -> tuple[str, str]:
    """Problem text and answer of item ``index`` of seed ``seed``."""
    rng = random.Random(f"var_chain:{seed}:{index}")
    names = string.ascii_lowercase[:cfg.steps]
    values: list[int] = []
    lines = []
    for i, name in enumerate(names):
        if i == 0:
            x, y = rng.randint(1, 9), rng.randint(0, 9)
            body, value = _combine(rng, str(x), str(y), x, y)
        elif i >= cfg.steps - cfg.recall:
            j = rng.randrange(cfg.min_depth - 1, i - cfg.min_gap + 1)
            body, value = _combine(rng, names[i - 1], names[j], values[i - 1], values[j])
        else:
            k = rng.randint(1, 9)
            body, value = _combine(rng, names[i - 1], str(k), values[i - 1], k)
        lines.append(f"{name}={body}")
        values.append(value)
    problem = "\n".join([_HEADER.format(var=names[-1]), *lines])
    return problem, str(values[-1])


def _program(problem: str) -> list[tuple[str, str, str, str]] | None:
    lines = problem.strip().split("\n")
    if len(lines) < 2 or not lines[0].startswith("Run the program and give the final value of "):
        return None
    parsed = [_STATEMENT_RE.match(line.strip()) for line in lines[1:]]
    return None if not all(parsed) else [m.groups() for m in parsed]  # type: ignore[union-attr]


def evaluate_program(problem: str) -> tuple[list[str], int]:
    """Worked lines and final value of a ``var_chain`` problem text (independent of the generator's bookkeeping).

    Raises:
        ValueError: the text is not a ``var_chain`` program, or uses a variable before assigning it.
    """
    program = _program(problem)
    if program is None:
        raise ValueError(f"not a var_chain program: {problem[:80]!r}")
    env: dict[str, int] = {}
    lines = []
    for name, x, op, y in program:
        vals = []
        for operand in (x, y):
            if operand.isdigit():
                vals.append(int(operand))
            elif operand in env:
                vals.append(env[operand])
            else:
                raise ValueError(f"var_chain program uses {operand!r} before assigning it: {problem[:80]!r}")
        env[name] = vals[0] + vals[1] if op == "+" else vals[0] - vals[1]
        symbolic = f"{x}{op}{y}"
        numeric = f"{vals[0]}{op}{vals[1]}"
        lines.append(f"{name}={symbolic}={env[name]}" if symbolic == numeric else
                     f"{name}={symbolic}={numeric}={env[name]}")
    return lines, env[program[-1][0]]


@dataclass(frozen=True)
class Recall:
    """One use of an early variable: statement ``name = x op y`` whose operand ``operand`` (0 = x, 1 = y) is
    ``variable`` (not the previous statement's), of value ``value``."""

    name: str
    body: tuple[str, str, str]  # (x, op, y)
    operand: int
    variable: str
    value: int


def recalls(problem: str) -> list[Recall]:
    """The recalling statements of a ``var_chain`` program (empty for any other text)."""
    program = _program(problem)
    if program is None:
        return []
    env: dict[str, int] = {}
    out = []
    for i, (name, x, op, y) in enumerate(program):
        previous = program[i - 1][0] if i else None
        for pos, operand in enumerate((x, y)):
            if operand.isalpha() and operand != previous and operand in env:
                out.append(Recall(name, (x, op, y), pos, operand, env[operand]))
        vals = [int(o) if o.isdigit() else env.get(o, 0) for o in (x, y)]
        env[name] = vals[0] + vals[1] if op == "+" else vals[0] - vals[1]
    return out


def _recall_match(recall: Recall, text: str) -> re.Match | None:
    """The worked line of ``recall``'s statement in ``text`` (``h=g+c=2+4...``), digits captured."""
    x, op, y = recall.body
    return re.search(rf"^\s*{recall.name}={x}\{op}{y}=(\d+)\{op}(\d+)", text, flags=re.MULTILINE)


def recall_spans(problem: str, solution: str) -> list[tuple[int, int]]:
    """Character spans, in a worked ``solution``, of the values it recalls from early variables.

    These are the tokens that need an evicted thought under a small window: the recall metric's positions.
    """
    spans = []
    for r in recalls(problem):
        m = _recall_match(r, solution)
        if m is not None:
            spans.append(m.span(r.operand + 1))
    return spans


def recall_score(problem: str, completion: str) -> tuple[int, int]:
    """``(correct, total)`` recalled values in a completion: a recall counts as correct when the completion writes
    the statement's worked line with the early variable's true value (a missing line counts as wrong)."""
    found = [_recall_match(r, completion) for r in recalls(problem)]
    correct = sum(m is not None and m.group(r.operand + 1) == str(r.value)
                  for r, m in zip(recalls(problem), found, strict=True))
    return correct, len(found)


def _chain_sum_solution(problem: str) -> str | None:
    m = _CHAIN_SUM_RE.match(problem.strip())
    if not m:
        return None
    tokens = m.group(1).split()
    if len(tokens) < 3 or len(tokens) % 2 == 0 or not all(t.lstrip("-").isdigit() for t in tokens[::2]) or \
            not all(t in "+-" for t in tokens[1::2]):
        return None
    total = int(tokens[0])
    lines = []
    for op, term in zip(tokens[1::2], tokens[2::2], strict=True):
        new = total + int(term) if op == "+" else total - int(term)
        lines.append(f"{total} {op} {term} = {new}")
        total = new
    return "\n".join([*lines, f"\\boxed{{{total}}}"])


def worked_solution(source: str, problem: str) -> str | None:
    """A step-by-step solution ending in ``\\boxed{answer}``, or None when the source has no solver.

    Solvable sources: ``var_chain`` and ``reasoning_gym:chain_sum``.
    """
    if source == "var_chain":
        lines, value = evaluate_program(problem)
        return "\n".join([*lines, f"\\boxed{{{value}}}"])
    if source == "reasoning_gym:chain_sum":
        return _chain_sum_solution(problem)
    return None


def worked_solutions(rows, where: str, fix: str) -> list[str]:
    """:func:`worked_solution` of every row (anything with ``id``, ``source``, ``problem``).

    Raises:
        ValueError: a row's source has no solution writer: ``"<where>: no worked solution for row '<id>' (source
            '<source>'); <fix>"``.
    """
    solutions = []
    for r in rows:
        solution = worked_solution(r.source, r.problem)
        if solution is None:
            raise ValueError(f"{where}: no worked solution for row {r.id!r} (source {r.source!r}); {fix}")
        solutions.append(solution)
    return solutions


TASKS = {"var_chain": (VarChainConfig, var_chain)}
"""Our own generators by source name: (settings dataclass, ``fn(settings, seed, index) -> (problem, answer)``)."""
