"""var_chain generator and worked solutions, checked against Python itself running the program."""

from __future__ import annotations

import re

import pytest

from pte.data.rewards import score
from pte.data.sources import SourceSpec, load_source
from pte.data.tasks import VarChainConfig, evaluate_program, var_chain, worked_solution


def _run_python(problem: str) -> dict[str, int]:
    """The independent reference: the program lines are valid Python assignments."""
    env: dict[str, int] = {}
    exec("\n".join(problem.split("\n")[1:]), {}, env)  # noqa: S102 - our own generated arithmetic
    return env


@pytest.mark.parametrize("cfg", [VarChainConfig(), VarChainConfig(steps=12, recall=3, min_gap=3, min_depth=4),
                                 VarChainConfig(steps=7, recall=1, min_gap=4, min_depth=3)])
def test_var_chain_answers_match_python(cfg):
    for i in range(200):
        problem, answer = var_chain(cfg, seed=3, index=i)
        env = _run_python(problem)
        names = [line.split("=")[0] for line in problem.split("\n")[1:]]
        assert len(names) == cfg.steps and problem.split("\n")[0].endswith(f"value of {names[-1]}.")
        assert answer == str(env[names[-1]])
        assert all(0 <= v <= 9 for v in env.values())  # one-digit arithmetic only
        lines, value = evaluate_program(problem)
        assert value == env[names[-1]] and len(lines) == cfg.steps


def test_recalled_variables_are_deep_and_far_back():
    cfg = VarChainConfig(steps=8, recall=2, min_gap=3, min_depth=2)
    seen_gaps = set()
    for i in range(300):
        problem, _ = var_chain(cfg, seed=0, index=i)
        stmts = problem.split("\n")[1:]
        names = [s.split("=")[0] for s in stmts]
        for pos in range(cfg.steps - cfg.recall, cfg.steps):
            used = [c for c in stmts[pos].split("=")[1] if c.isalpha()]
            assert names[pos - 1] in used  # the previous variable, as every statement
            early = [names.index(c) for c in used if c != names[pos - 1]]
            assert len(early) == 1 and pos - early[0] >= cfg.min_gap and early[0] + 1 >= cfg.min_depth
            seen_gaps.add(pos - early[0])
        for pos in range(1, cfg.steps - cfg.recall):  # the others use the previous variable and a constant only
            assert [c for c in stmts[pos].split("=")[1] if c.isalpha()] == [names[pos - 1]]
    assert len(seen_gaps) > 1  # the gap varies


def test_var_chain_is_deterministic_per_item_and_varied():
    cfg = VarChainConfig()
    assert var_chain(cfg, 5, 17) == var_chain(cfg, 5, 17)
    assert var_chain(cfg, 5, 17) != var_chain(cfg, 6, 17)
    problems = {var_chain(cfg, 0, i)[0] for i in range(500)}
    assert len(problems) == 500
    answers = [var_chain(cfg, 0, i)[1] for i in range(500)]
    assert max(answers.count(str(d)) for d in range(10)) < 0.2 * len(answers)  # no answer to guess blindly


def test_worked_solution_is_right_and_recalls_values():
    cfg = VarChainConfig()
    for i in range(100):
        problem, answer = var_chain(cfg, 1, i)
        sol = worked_solution("var_chain", problem)
        assert sol.endswith(f"\\boxed{{{answer}}}") and score(sol, answer) == 1.0
        lines = sol.split("\n")[:-1]
        env = _run_python(problem)
        for line in lines:  # "b=a+1=7+1=8": the symbolic form, the recalled values, the result
            parts = line.split("=")
            assert int(parts[-1]) == env[parts[0]]
            if len(parts) == 4:
                assert eval(parts[2]) == env[parts[0]]  # noqa: S307 - digits and +/- only
                symbols = re.findall(r"[a-z0-9]", parts[1])
                assert [str(env[s]) if s.isalpha() else s for s in symbols] == re.findall(r"\d", parts[2])


def test_chain_sum_worked_solution_matches_reasoning_gym():
    rows = load_source(SourceSpec("reasoning_gym:chain_sum", count=40, seed=0,
                                  kwargs={"min_terms": 2, "max_terms": 5, "min_digits": 1, "max_digits": 3}))
    for row in rows:
        sol = worked_solution(row.source, row.problem)
        assert sol.endswith(f"\\boxed{{{row.answer}}}") and score(sol, row.answer) == 1.0
    assert worked_solution("reasoning_gym:chain_sum", "What is 2 + 2?") is None
    assert worked_solution("champ", "anything") is None


def test_var_chain_source_and_settings_errors():
    rows = load_source(SourceSpec("var_chain", count=3, seed=9, kwargs={"steps": 9}))
    assert [r.id for r in rows] == ["var_chain:9:0", "var_chain:9:1", "var_chain:9:2"]
    assert rows[0].problem == var_chain(VarChainConfig(steps=9), 9, 0)[0]
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['stepz'\].*allowed for var_chain"):
        load_source(SourceSpec("var_chain", count=3, kwargs={"stepz": 9}))
    with pytest.raises(ValueError, match="steps = 5 is too few.*steps >= recall \\+ min_gap \\+ min_depth - 1 = 7"):
        load_source(SourceSpec("var_chain", count=3, kwargs={"steps": 5}))
    with pytest.raises(ValueError, match="count` is null but var_chain is a generator"):
        load_source(SourceSpec("var_chain"))
    for bad in ({"steps": 27}, {"min_gap": 1}, {"recall": -1}):
        with pytest.raises(ValueError, match="var_chain"):
            VarChainConfig(**bad)
    with pytest.raises(ValueError, match="not a var_chain program"):
        evaluate_program("a=1+2")
    with pytest.raises(ValueError, match="uses 'z' before assigning it"):
        evaluate_program("Run the program and give the final value of b.\na=1+2\nb=z+1")


def test_recall_metric_finds_the_recalled_value_and_scores_completions():
    from pte.data.tasks import recall_score, recall_spans, recalls

    problem, answer = var_chain(VarChainConfig(), 0, 3)
    solution = worked_solution("var_chain", problem)
    (r,) = recalls(problem)  # one recalling statement by default
    program = problem.split("\n")[1:]
    assert program[-1] == f"{r.name}={''.join(r.body)}" and r.variable in r.body
    (lo, hi), = recall_spans(problem, solution)
    assert solution[lo:hi] == str(r.value)
    assert recall_score(problem, solution) == (1, 1)
    wrong = solution[:lo] + str((r.value + 1) % 10) + solution[hi:]
    assert recall_score(problem, wrong) == (0, 1)
    assert recall_score(problem, "no worked lines") == (0, 1)
    assert recalls("What is 2 + 2?") == [] and recall_score("What is 2 + 2?", "4") == (0, 0)
    many = var_chain(VarChainConfig(steps=10, recall=3, min_gap=3), 5, 0)[0]
    assert len(recalls(many)) >= 3
