"""The course kit: a student copy of the project with the paper's equations cut out, and its grader.

    python course/exercises.py make ../rwml-student   # (make exercises) the copy, with EXERCISES.md
    python course/exercises.py grade [--json F]       # (make grade, in the copy) one line an exercise, a total,
                                                      # each failed test with its first failing line and what
                                                      # it checks; exit status 1 unless all passed
    python course/exercises.py grade ../alice         # (make grade SUBMISSION=../alice, in the reference) a
                                                      # TA's grading: each exercise block alone, the reference's
                                                      # tests (see grade_submission)
    python course/exercises.py fill ../rwml-student   # put the reference blocks back (the solution key;
                                                      # --only 1 3: those exercises)

An exercise is a block of the reference code between two marker comments:

    # ---- EXERCISE 4: the clipped surrogate (paper Sec. 2.2) ----
    # Eq. GRPO clipped surrogate: ...
    ratio = ...
    # ---- END EXERCISE 4 ----

The student copy keeps the markers and the block's comment lines (the equation) and replaces its code by
`raise NotImplementedError("Exercise 4: the clipped surrogate, see paper Sec. 2.2")`. The graders are the
project's own tests (hand-computed values and properties on real tensors, the real tiny model and
embedder, the real engine): no file of the copy holds a line of an answer. The copy is a git repository of
its own with every file staged and no commit (`git diff` shows the student's work), so it can make a copy in
turn, as the reference does.
"""

import argparse
import contextlib
import io
import json
import linecache
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the files that hold exercise blocks
SOURCES = ("reward.py", "grpo.py", "train_wm.py", "train_policy.py", "evaluate.py", "collect.py")
BLOCK = re.compile(
    r"^(?P<indent>[ \t]*)# ---- EXERCISE (?P<n>\d+): (?P<title>.+) \(paper,? (?P<sec>[^)]+)\) ----\n"
    r"(?P<body>.*?)"
    r"^(?P=indent)# ---- END EXERCISE (?P=n) ----\n",
    re.M | re.S,
)

# what each exercise asks, and the tests that grade it, in the suggested order: the reward, the advantages and
# the GRPO loss, the world model's data and target, the policy's turns, forgetting; then the whole pipeline runs
EXERCISES = {
    1: (
        "Score predictions that have tags: from the unit embeddings `e_pred`, `e_real` compute the cosine `cos` and "
        "the reward `reward` (a float tensor, 1 where the distance 1 - cos is below `tau`).",
        [
            "tests/test_reward.py::test_identical_next_state_scores_1_unrelated_0_missing_tags_0",
            "tests/test_reward.py::test_threshold_is_on_the_distance",
            "tests/test_reward.py::test_real_next_states_are_embedded_once_and_predictions_not_kept",
            "tests/test_reward.py::test_exact_is_the_real_next_state_up_to_whitespace",
        ],
    ),
    2: (
        "Return the ROUGE-L F1 of the prediction against the reference (the `rouge_score` package), rounded to "
        "the nearest multiple of 0.2, halves up (0.5 -> 0.6).",
        ["tests/test_reward.py::test_rouge_is_rounded_to_fifths"],
    ),
    3: (
        "From the rewards `r`, one row per group of G, compute `adv`: each reward minus its group's mean, divided "
        "by the group's (unbiased) standard deviation plus `eps`.",
        ["tests/test_grpo.py::test_group_advantages_by_hand"],
    ),
    4: (
        "Compute the per-token ratio `ratio` = pi / pi_old from the log-probabilities and the clipped surrogate "
        "`surrogate` = min(ratio A, clip(ratio, 1 - eps, 1 + eps) A), A broadcast over each row's tokens.",
        ["tests/test_grpo.py::test_clipped_objective_gradient_sign_and_clipping"],
    ),
    5: (
        "Compute `kl`, the k3 estimate of KL(pi || pi_ref) per token, from the log-probabilities `logp` of the policy "
        "and `ref_logp` of the reference.",
        [
            "tests/test_grpo.py::test_k3_kl_by_hand",
            "tests/test_grpo.py::test_kl_zero_and_ratio_one_when_policy_old_and_reference_coincide",
        ],
    ),
    6: (
        "Compute `norm`, each sequence's divisor of its summed token losses: the batch's completion tokens "
        "(token mean) or its own length times the number of sequences (sequence mean), over all ranks.",
        [
            "tests/test_grpo.py::test_loss_normalisation_token_mean_and_sequence_mean",
            "tests/test_grpo.py::test_grpo_on_a_verifiable_reward_raises_the_mean_reward",
            "tests/test_grpo.py::test_checkpoint_resume_restores_step_optimizer_and_adapters",
            "tests/test_grpo.py::test_log_probs_and_the_update_are_those_of_the_sampling_temperature",
        ],
    ),
    7: (
        "Mark each scored triplet easy or not (`easy`) and keep the hard ones and, with probability `keep_easy` "
        "(one `rng.random()` draw per easy triplet, in order), the easy ones (`kept`).",
        ["tests/test_train_wm.py::test_filter_keeps_hard_triplets_and_a_tenth_of_easy_ones"],
    ),
    8: (
        "Return WM SFT's target token ids `y` (the equation above, tokenised without special tokens, then the "
        "tokenizer's end token): the answer a world model without reasoning writes.",
        [
            "tests/test_train_wm.py::test_sft_target_is_an_empty_thought_then_the_real_next_state",
            "tests/test_train_wm.py::test_sft_lowers_the_loss_on_its_batch",
        ],
    ),
    9: (
        "Build the policy's turn batch: the episodes' rewards, their group-normalised advantages `adv` and the "
        "number of groups without signal `no_signal` (Exercise 3's function), then `turns`, the (sequence, "
        "advantage) pairs of every agent turn in order, leaving out turns without tokens and episodes whose "
        "advantage is 0.",
        [
            "tests/test_train_policy.py::test_every_turn_gets_its_episodes_advantage",
            "tests/test_train_policy.py::test_a_group_where_every_episode_fails_gives_nothing_to_train",
        ],
    ),
    10: (
        "Of one parameter tensor: `counted`, the weights finite and non-zero before and after; `moved`, those of "
        "them whose change exceeds `eta` times the larger of their two absolute values; `changed` and `total`, "
        "the numbers of each.",
        ["tests/test_evaluate.py::test_weight_changes_count_exactly_the_weights_moved_beyond_eta_of_the_larger_value"],
    ),
    11: (
        "Turn an ALFWorld rollout (its `turns`, each with observation, action and valid, and its final observation) "
        "into one triplet a turn: the state with the last `h` turns of history, the action, and the observation "
        "that followed. The grader plays real games and replays every action in a fresh engine.",
        ["tests/test_collect.py::test_collect_with_the_tiny_model_writes_schema_valid_records"],
    ),
}


def stub(m):
    """A block as the student gets it: its comment lines, then a NotImplementedError naming it."""
    comments = [line for line in m["body"].splitlines(keepends=True) if line.strip().startswith("#")]
    raise_line = f'{m["indent"]}raise NotImplementedError("Exercise {m["n"]}: {m["title"]}, see paper {m["sec"]}")\n'
    return m[0].replace(m["body"], "".join(comments) + raise_line)


def blocks(root):
    """{exercise number: (file, the marked block's text)} of a tree; a tree without every exercise's block (not
    a copy of this project) is a one-line error."""
    root = Path(root)
    missing = [f for f in SOURCES if not (root / f).is_file()]
    if missing:
        raise SystemExit(f"error: {root} holds no {missing[0]}: give the folder of a copy of this project")
    found = {int(m["n"]): (f, m[0]) for f in SOURCES for m in BLOCK.finditer((root / f).read_text())}
    if sorted(found) != sorted(EXERCISES):
        lost = sorted(set(EXERCISES) - set(found))
        raise SystemExit(f"error: {root} lacks the marked block of exercise {lost[0] if lost else '?'}")
    return found


def unanswered(found):
    """The exercise numbers whose block is the student's stub (no answer in it)."""
    return sorted(n for n, (_, text) in found.items() if 'raise NotImplementedError("Exercise' in text)


def make(out):
    """The student copy of the project's tracked files, every exercise block stubbed, with EXERCISES.md."""
    out = Path(out)
    if out.exists():
        raise SystemExit(f"error: {out} exists: give the student copy a new folder")
    blocks(ROOT)  # every exercise marked in this tree
    files = tracked(ROOT)
    for f in files:
        (out / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, out / f)
    for f in SOURCES:
        (out / f).write_text(BLOCK.sub(stub, (ROOT / f).read_text()))
    (out / "EXERCISES.md").write_text(exercises_md(blocks(ROOT)))
    for git_args in (["init", "-q"], ["add", "-A"]):  # its files staged: `git ls-files` lists them, `git diff` the work
        subprocess.run(["git", *git_args], cwd=out, check=True, capture_output=True)
    print(f"student copy with {len(EXERCISES)} exercises -> {out} (see {out}/EXERCISES.md)")


def fill(student, only=None):
    """Put the reference blocks back into a student copy (only those of the exercise numbers `only`). The answers
    come from the reference checkout this script lives in: run from a student copy, it has none to give."""
    reference = blocks(ROOT)
    stubs = [n for n in unanswered(reference) if only is None or n in only]
    if stubs:
        raise SystemExit(
            f"error: fill takes the answers from the reference checkout this script is in ({ROOT}), and its "
            f"exercise {stubs[0]} is a stub: run the reference's course/exercises.py fill {Path(student).resolve()}"
        )
    if Path(student).resolve() == ROOT:
        raise SystemExit(f"error: fill puts the answers into a student copy, and {student} is this reference checkout")
    blocks(student)  # a copy of this project, every exercise marked
    put = lambda m: reference[int(m["n"])][1] if only is None or int(m["n"]) in only else m[0]
    for f in SOURCES:
        path = Path(student) / f
        path.write_text(BLOCK.sub(put, path.read_text()))


def exercises_md(reference):
    lines = [
        "# Exercises: RWML and GRPO by hand\n",
        "Each exercise is one equation or one step of the paper, cut out of the reference implementation and marked",
        "in its file by `# ---- EXERCISE N ----` comments: replace the `raise NotImplementedError(...)` line between",
        "them with your code (the comments above it give the equation; the function's docstring says what goes in",
        "and out). Exercises 1-10 are a few lines each; 11 is a whole step (the interaction triplets).\n",
        "**Checking your work.** `make grade` runs the tests of every exercise you have started and prints one line",
        "an exercise (passed / failed / not attempted), under a failed one each failed test, the line where it",
        "failed and what it checks; it exits with status 1 unless every exercise passed, and `make grade",
        "JSON=result.json` writes the same as JSON. `python -m pytest -q TEST` runs one test. In this copy an",
        "exercise's tests run the code of the other exercises too (Exercise 6's whole GRPO update needs 3, 4 and 5;",
        "4 and 5 are independent of each other): the suggested order below meets that.\n",
        "**Without a second environment.** `make grade` installs the project's environment (~2 GB) into `.venv`",
        "first; `make grade PYTHON=/path/to/python` uses one that exists, e.g. the reference checkout's",
        "`.venv/bin/python`. Grading every exercise takes a few minutes on two cores (the graders load the tiny",
        "model and the embedder once; Exercise 6's and 11's run whole updates and real ALFWorld games).\n",
        "**How it is graded.** From the reference checkout, `make grade SUBMISSION=path/to/this/copy",
        "JSON=result.json` takes only your exercise blocks: each one alone, in a copy of the reference with every",
        "other exercise solved, against the reference's own tests (so editing the tests here changes nothing).",
        "Then `make test` runs the whole suite and `make pipeline` the whole paper on the tiny model.\n",
    ]
    for n, (task, graders) in EXERCISES.items():
        f, text = reference[n]
        m = BLOCK.match(text)
        equation = [
            line.strip().lstrip("# ").removeprefix("ALGO LOGIC. ")
            for line in m["body"].splitlines()
            if line.strip().startswith("#")
        ]
        lines += [f"## Exercise {n}: {m['title']} (paper {m['sec']})\n", f"In `{f}`. {task}\n"]
        lines += ["```", *equation, "```\n"] if equation else []
        lines += ["Graded by:", *(f"- `{g}`" for g in graders), ""]
    return "\n".join(lines)


class Progress:
    """A pytest plugin: each test's outcome, where it first failed and what it checks, and a line on stderr as each
    test ends."""

    def __init__(self):
        self.total, self.done, self.outcome, self.where, self.checks = 0, 0, {}, {}, {}

    def pytest_collection_finish(self, session):
        self.total = len(session.items)
        for item in session.items:  # what a test checks: its docstring's first sentence
            doc = " ".join((getattr(item, "obj", None).__doc__ or "").split())
            self.checks[item.nodeid] = doc.split(". ")[0].rstrip(".")

    def pytest_runtest_logreport(self, report):  # setup, call and teardown of a test: a failure in any fails it
        if report.failed and self.outcome.get(report.nodeid) != "FAILED":
            self.outcome[report.nodeid] = "FAILED"
            crash = getattr(report.longrepr, "reprcrash", None)
            where, comment = first_failing_line(crash) if crash else (str(report.longrepr).splitlines()[-1], "")
            self.where[report.nodeid] = where
            self.checks[report.nodeid] = self.checks.get(report.nodeid) or comment
        elif report.when == "call" or report.skipped:
            self.outcome.setdefault(report.nodeid, "PASSED" if report.passed else "SKIPPED")

    def pytest_runtest_logfinish(self, nodeid):
        self.done += 1
        print(f"  [{self.done}/{self.total}] {self.outcome.get(nodeid, '?'):<7} {nodeid}", file=sys.stderr, flush=True)


def first_failing_line(crash):
    """(`file:line: ...` of a failure: where it was raised, its source line when that is an assertion, and the
    message's first line (an assertion's values, or the exception: an exercise's stub names its exercise); the
    comment that says what the failing line checks: on it, or on the lines just above it)."""
    path = Path(crash.path)
    where = f"{path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}:{crash.lineno}"
    message = crash.message.splitlines()[0] if crash.message else ""
    source = linecache.getline(str(path), crash.lineno)
    shown = f"{source.strip()}  ({message})" if source.strip().startswith("assert") else message
    comment = source.partition("  # ")[2].strip()
    above = crash.lineno - 1
    while not comment and linecache.getline(str(path), above).strip().startswith("#"):
        comment, above = linecache.getline(str(path), above).strip().lstrip("# ") + " " + comment, above - 1
    return f"{where}: {shown}"[:200], comment.strip()


def grade(root=ROOT, only=None):
    """Grades the exercises attempted in the tree `root` with its own tests (`only`: those numbers). Returns one
    result an exercise: dict(exercise, title, status: passed / failed / not attempted, passed, tests, failures:
    [dict(test, where, checks)]); a line on stderr as each test ends."""
    found = blocks(root)
    todo = set(found) - set(unanswered(found)) - (set() if only is None else set(EXERCISES) - set(only))
    graders = sorted({g for n in todo for g in EXERCISES[n][1]})
    progress = Progress()
    if graders:
        try:
            import pytest  # the project's environment (make install); grading nothing needs none
        except ImportError:
            raise SystemExit("error: grading runs the tests: `make grade` installs the environment first") from None
        print(f"grading {len(todo)} exercises: {len(graders)} tests", file=sys.stderr)
        with contextlib.chdir(root), contextlib.redirect_stdout(io.StringIO()):  # pytest's own report: not shown
            pytest.main(["-q", "--tb=short", "-p", "no:cacheprovider", "-n", "0", *graders], plugins=[progress])
    results = []
    for n, (_, tests) in EXERCISES.items():
        if only is not None and n not in only:
            continue
        runs = {
            node: o for node, o in progress.outcome.items() if any(node == t or node.startswith(t + "[") for t in tests)
        }
        ok = n in todo and runs and all(o == "PASSED" for o in runs.values())
        failures = (
            [
                dict(
                    test=node,
                    where=progress.where.get(node, "not run (a test of its file failed to import?)"),
                    checks=progress.checks.get(node, ""),
                )
                for node, o in runs.items()
                if o != "PASSED"
            ]
            if n in todo
            else []
        )
        status = "not attempted" if n not in todo else "passed" if ok else "failed"
        title = BLOCK.match(found[n][1])["title"]
        results.append(
            dict(
                exercise=n,
                title=title,
                status=status,
                passed=sum(o == "PASSED" for o in runs.values()),
                tests=len(runs),
                failures=failures,
            )
        )
    return results


def grade_submission(student):
    """A TA's grading: each exercise the student's copy at `student` attempted, graded alone, against this
    reference checkout's tests, in a temporary copy of it whose only change is the student's block of that
    exercise (the other exercises are the reference's; the student's tests are not run). Returns `grade`'s
    results."""
    submitted, reference = blocks(student), blocks(ROOT)
    files = tracked(ROOT)
    env = dict(os.environ, ALFWORLD_DATA=os.environ.get("ALFWORLD_DATA", str(ROOT.parent / "shared" / "alfworld")))
    results = []
    for n in EXERCISES:
        title = BLOCK.match(reference[n][1])["title"]
        if n in unanswered(submitted):
            results.append(dict(exercise=n, title=title, status="not attempted", passed=0, tests=0, failures=[]))
            continue
        with tempfile.TemporaryDirectory() as tree:
            for f in files:
                (Path(tree) / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / f, Path(tree) / f)
            f, block = reference[n]
            (Path(tree) / f).write_text((ROOT / f).read_text().replace(block, submitted[n][1]))
            out = Path(tree) / "result.json"
            cmd = [sys.executable, "course/exercises.py", "grade", "--only", str(n), "--json", str(out)]
            print(f"exercise {n}: the reference's tests on the submitted block", file=sys.stderr, flush=True)
            subprocess.run(cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL)
            if not out.exists():
                raise SystemExit(f"error: grading exercise {n} in a copy of {ROOT} wrote no result (see above)")
            results += json.loads(out.read_text())["exercises"]
    return results


def tracked(root):
    """The files git tracks in `root` (a reference or student checkout)."""
    git = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True)
    if git.returncode:
        raise SystemExit(f"error: {root} is not a git checkout: the kit copies the files git tracks")
    return git.stdout.split()


def report(results, json_path=None):
    """One line an exercise, under a failed one each failed test (where, and what it checks), the total; the same as
    JSON in `json_path`. Returns the exit status: 0 when every exercise passed, else 1."""
    width = max(len(r["title"]) for r in results)
    for r in results:
        count = f" ({r['passed']} of {r['tests']} tests)" if r["status"] != "not attempted" else ""
        print(f"Exercise {r['exercise']:>2}: {r['title']:<{width}}  {r['status']}{count}")
        for fail in r["failures"]:
            print(f"    {fail['test']}\n        {fail['where']}")
            if fail["checks"]:
                print(f"        checks: {fail['checks']}")
    passed = sum(r["status"] == "passed" for r in results)
    print(f"total: {passed} of {len(results)} exercises passed")
    if json_path:
        total = dict(passed=passed, exercises=len(results))
        Path(json_path).write_text(json.dumps(dict(total=total, exercises=results), indent=1) + "\n")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["make", "grade", "fill"])
    p.add_argument(
        "folder",
        nargs="?",
        help="make, fill: the student copy; grade: a submission (a student copy) to "
        "grade against this checkout's tests, each exercise alone (default: grade this tree)",
    )
    p.add_argument("--only", type=int, nargs="+", choices=list(EXERCISES), help="fill, grade: these exercises only")
    p.add_argument("--json", metavar="FILE", help="grade: the results as JSON too")
    p.add_argument("--seed", type=int, default=0, help="unused: nothing here is random (every script takes it)")
    a = p.parse_args()
    if a.command != "grade" and not a.folder:
        raise SystemExit(f"error: {a.command} needs the student copy's folder")
    if a.command == "make":
        make(a.folder)
    elif a.command == "fill":
        fill(a.folder, a.only)
    else:
        results = grade_submission(a.folder) if a.folder else grade(only=a.only)
        raise SystemExit(report([r for r in results if a.only is None or r["exercise"] in a.only], a.json))
