"""The course kit round trip: the student copy fails exactly its exercises' graders, `make grade` tells
passed / failed / not attempted, and the solution key gives back the reference byte for byte (whose graders
pass: they are this suite's own tests)."""

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


def grade(folder):
    """`exercises.py grade` in `folder`: its stdout's lines (stderr: a line as each test ends)."""
    r = subprocess.run([sys.executable, "course/exercises.py", "grade"], cwd=folder, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.splitlines(), r.stderr


def test_the_student_copy_holds_no_answer_and_fill_gives_back_the_reference(tmp_path):
    student = tmp_path / "student"
    # `make exercises` before any install: the standard library's python3 where the environment is missing
    r = subprocess.run(
        ["make", "-s", "exercises", f"STUDENT={student}", f"VENV={tmp_path / 'none'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and r.stdout.startswith("student copy with 10 exercises"), r.stderr
    staged = subprocess.run(["git", "ls-files"], cwd=student, capture_output=True, text=True).stdout.split()
    assert "EXERCISES.md" in staged and "tests/test_course.py" in staged  # a checkout of its own: it can copy on
    found, reference = blocks(student), blocks(ROOT)
    assert sorted(found) == sorted(reference) == list(EXERCISES) == list(range(1, 11))
    for n, (f, text) in found.items():
        assert f'raise NotImplementedError("Exercise {n}: ' in text
        code = [line for line in reference[n][1].splitlines()[1:-1] if not line.strip().startswith("#")]
        assert code and not set(code) & set((student / f).read_text().splitlines()), n  # no line of the answer
    assert all(f"## Exercise {n}:" in (student / "EXERCISES.md").read_text() for n in EXERCISES)
    assert grade(student)[0][-1] == "total: 0 of 10 exercises passed"  # nothing attempted: nothing runs
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
    # a right answer to exercises 2, 3 and 5, a wrong one to exercise 4 (no clipping), nothing else
    fill(student, only=[2, 3, 5])
    grpo = (student / "grpo.py").read_text()
    wrong = "    ratio = torch.exp(logp - old_logp)\n    surrogate = ratio * adv[:, None]\n"
    grpo = re.sub(r'    raise NotImplementedError\("Exercise 4: [^\n]*\n', wrong, grpo)
    (student / "grpo.py").write_text(grpo)
    lines, progress = grade(student)
    rows = {int(line.split(":")[0].split()[1]): line for line in lines if line.startswith("Exercise")}
    assert sorted(rows) == list(EXERCISES) and len({line.rindex("  ") for line in rows.values()}) == 1  # aligned
    assert rows[2].endswith("  passed (1 of 1 tests)") and rows[3].endswith("  passed (1 of 1 tests)")
    assert rows[5].endswith("  passed (2 of 2 tests)")
    assert rows[4].endswith("  failed (0 of 2 tests)")  # the test runs with a positive and a negative advantage
    assert all(rows[n].endswith("  not attempted") for n in EXERCISES if n not in (2, 3, 4, 5))
    # under the failed exercise: its test, and the assertion that failed (no gradient beyond the clipped ratio)
    test, where = lines[lines.index(rows[4]) + 1 : lines.index(rows[4]) + 3]
    assert test.strip().startswith(EXERCISES[4][1][0] + "[") and where.strip().startswith("tests/test_grpo.py:"), lines
    assert "assert " in where and "logp.grad" in where and lines[-1] == "total: 3 of 10 exercises passed"
    assert progress.count("\n") == 7 and "[6/6] " in progress  # "grading ...", then a line as each test ends
