"""The course kit round trip: the student copy holds no line of an answer in any file and fails exactly its
exercises' graders; `make grade` tells passed / failed / not attempted with an exit status and JSON, each exercise
graded alone against the reference's tests for a TA; the solution key gives back the reference byte for byte
(whose graders pass: they are this suite's own tests)."""

import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "course"))
from exercises import EXERCISES, blocks, fill, make  # noqa: E402


def outcomes(folder, *tests):
    """{test node: PASSED / FAILED / ERROR} of a pytest run in `folder`, and its output."""
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-n", "0", *tests],
        cwd=folder,
        capture_output=True,
        text=True,
    )
    found = re.findall(r"^(PASSED|FAILED|ERROR) (\S+)", r.stdout, re.M)
    return {node: word for word, node in found}, r.stdout


def grade(folder, *args):
    """`exercises.py grade ARGS` in `folder`: its exit status, its stdout's lines (stderr: a line as each test ends)."""
    r = subprocess.run(
        [sys.executable, "course/exercises.py", "grade", *args], cwd=folder, capture_output=True, text=True
    )
    assert r.returncode in (0, 1), r.stderr[-2000:]
    return r.returncode, r.stdout.splitlines(), r.stderr


def answer_lines(text):
    """The lines of code of a reference block that say something: not its markers, comments, a bare `dict(`, or a
    record's field passed on as it is (`task=rollout["task"],`: the triplet schema, which the exercise states)."""
    code = [line.strip() for line in text.splitlines()[1:-1] if not line.strip().startswith("#")]
    field = re.compile(r'(\w+)=(\w+|rollout\["\1"\]),')
    return {line for line in code if len(re.sub(r"\W", "", line)) >= 8 and not field.fullmatch(line)}


def test_the_student_copy_holds_no_answer_and_fill_gives_back_the_reference(tmp_path):
    student = tmp_path / "student"
    # `make exercises` before any install: the standard library's python3 where the environment is missing
    r = subprocess.run(
        ["make", "-s", "exercises", f"STUDENT={student}", f"VENV={tmp_path / 'none'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and r.stdout.startswith("student copy with 11 exercises"), r.stderr
    staged = subprocess.run(["git", "ls-files"], cwd=student, capture_output=True, text=True).stdout.split()
    assert "EXERCISES.md" in staged and "tests/test_course.py" in staged  # a checkout of its own: it can copy on
    found, reference = blocks(student), blocks(ROOT)
    assert sorted(found) == sorted(reference) == list(EXERCISES) == list(range(1, 12))
    assert all(f'raise NotImplementedError("Exercise {n}: ' in text for n, (_, text) in found.items())
    # no file of the copy holds a line of an answer: not the exercise's file, not the tests, not the kit
    answers = {n: answer_lines(text) for n, (_, text) in reference.items()}
    assert all(answers.values())
    for f in staged:
        lines = {line.strip() for line in (student / f).read_text(errors="replace").splitlines()}
        leaks = {n: lines & code for n, code in answers.items() if lines & code}
        assert not leaks, (f, leaks)
    assert all(f"## Exercise {n}:" in (student / "EXERCISES.md").read_text() for n in EXERCISES)
    status, lines, _ = grade(student)  # nothing attempted: nothing runs, and that is no pass
    assert status == 1 and lines[-1] == "total: 0 of 11 exercises passed"
    # fill as a student would run it after reading --help: the copy holds no answer to give, and says so
    r = subprocess.run(
        [sys.executable, "course/exercises.py", "fill", ".", "--only", "3"], cwd=student, capture_output=True, text=True
    )
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: fill takes the answers from the reference checkout this script is in")
    assert "exercise 3 is a stub" in r.stderr and blocks(student) == found  # nothing changed
    with pytest.raises(SystemExit, match="holds no reward.py: give the folder of a copy of this project"):
        fill(tmp_path / "nowhere")
    with pytest.raises(SystemExit, match="is this reference checkout"):
        fill(ROOT)
    fill(student)
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert [f for f in files if (student / f).read_bytes() != (ROOT / f).read_bytes()] == []


def test_the_student_copy_fails_exactly_the_graders_and_grade_tells_each_exercise(tmp_path):
    student = tmp_path / "student"
    make(student)
    graders = {g for _, tests in EXERCISES.values() for g in tests}
    files = sorted({g.split("::")[0] for g in graders if "test_grpo" in g or "test_reward" in g})
    slow = sorted(g for g in graders if g.split("::")[0] not in files)  # the other files: their graders only
    result, out = outcomes(student, *files, *slow)
    is_grader = lambda node: any(node == g or node.startswith(g + "[") for g in graders)
    assert {node for node, o in result.items() if o != "PASSED"} == {node for node in result if is_grader(node)}
    assert all(any(is_grader(node) and node.startswith(g) for node in result) for g in graders)  # each one ran
    assert out.count("NotImplementedError: Exercise") >= len(graders)
    # a right answer to exercise 4 alone (5, in the same function, still a stub), a wrong one to exercise 3 (the
    # biased standard deviation), nothing else
    fill(student, only=[4])
    grpo = (student / "grpo.py").read_text()
    wrong = "    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, correction=0, keepdim=True) + eps)\n"
    grpo = re.sub(r'    raise NotImplementedError\("Exercise 3: [^\n]*\n', wrong, grpo)
    (student / "grpo.py").write_text(grpo)
    status, lines, progress = grade(student, "--json", str(tmp_path / "mine.json"))
    rows = {int(line.split(":")[0].split()[1]): line for line in lines if line.startswith("Exercise")}
    assert sorted(rows) == list(EXERCISES) and len({line.rindex("  ") for line in rows.values()}) == 1  # aligned
    assert rows[4].endswith("  passed (2 of 2 tests)") and rows[3].endswith("  failed (0 of 1 tests)")
    assert all(rows[n].endswith("  not attempted") for n in EXERCISES if n not in (3, 4))
    assert status == 1 and lines[-1] == "total: 1 of 11 exercises passed"
    # under the failed exercise: its test, the assertion that failed, and what the test checks (its docstring)
    test, where, checks = lines[lines.index(rows[3]) + 1 : lines.index(rows[3]) + 4]
    assert test.strip() == EXERCISES[3][1][0] and where.strip().startswith("tests/test_grpo.py:"), lines
    assert "assert " in where and checks.strip().startswith("checks: Each reward minus its group's mean"), lines
    assert progress.count("\n") == 4 and "[3/3] " in progress  # "grading ...", then a line as each test ends
    mine = json.loads((tmp_path / "mine.json").read_text())
    assert mine["total"] == dict(passed=1, exercises=11)
    assert [(e["exercise"], e["status"], e["passed"], e["tests"]) for e in mine["exercises"][2:4]] == [
        (3, "failed", 0, 1),
        (4, "passed", 2, 2),
    ]
    # a TA grades the submission from the reference: its blocks alone, against the reference's tests; a test the
    # student rewrote to pass changes nothing
    tests = (student / "tests" / "test_grpo.py").read_text()
    (student / "tests" / "test_grpo.py").write_text(
        tests.replace("def test_group_advantages_by_hand():", "def test_group_advantages_by_hand():\n    return")
    )
    assert grade(student)[1][2].endswith("  passed (1 of 1 tests)")  # the copy's own tests: fooled
    status, lines, _ = grade(ROOT, str(student), "--json", str(tmp_path / "ta.json"))
    rows = {int(line.split(":")[0].split()[1]): line for line in lines if line.startswith("Exercise")}
    assert rows[3].endswith("  failed (0 of 1 tests)") and rows[4].endswith("  passed (2 of 2 tests)")
    assert status == 1 and json.loads((tmp_path / "ta.json").read_text())["total"] == dict(passed=1, exercises=11)
