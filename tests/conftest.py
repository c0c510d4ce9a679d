import io
import os
import runpy
import subprocess
import sys
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("ALFWORLD_DATA", str(ROOT.parent / "shared" / "alfworld"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests use no network: a model that is not here fails at once
if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2` (make test): one core per worker, its subprocesses too
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

# the tests that take 20 s or more (and their module fixtures'), the longest first: under `pytest -n 2` they start
# first and the short ones fill in after them, so the two workers end together
SLOW_FIRST = (
    "test_torchrun_trains_the_world_model_with_fsdp_and_the_policy_with_ddp",
    "test_the_pipeline_runs_end_to_end_and_prints_table_1",
    "test_gpu_stages_runs_on_cpu_and_a_resumed_rwml_run_equals_the_uninterrupted_one",
    "test_rwml_trains_on_tau2_triplets",
    "test_two_ranks_make_the_update_of_the_whole_batch",
    "test_the_student_copy_fails_exactly_the_graders_and_grade_tells_each_exercise",
    "test_one_update_makes_the_won_turns_likelier_and_the_lost_ones_less_likely",
    "test_grpo_on_a_verifiable_reward_raises_the_mean_reward",
    "test_plan_matches_measured_peak_of_an_update",
    "test_rwml_runs_checkpoints_and_resumes_without_duplicate_steps",
    "test_static_cache_decoding_is_the_eager_path_token_for_token",
    "test_sft_lowers_the_loss_on_its_batch",
    "test_expert_plan_wins_every_task_type",
    "test_the_filter_chain_scores_with_pi_prime_trained_on_its_own_share_of_games",
    "test_train_policy_skips_steps_without_signal_checkpoints_and_resumes",
    "test_kill_and_resume_gives_the_same_episodes_once",
    "test_a_half_converted_tiny_model_is_rebuilt_not_returned",
)
SHARED = ("mock_run", "group", "ranks")  # expensive module fixtures: their tests run on one worker, in a row


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the groups into the tests' ids
def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    group = {}  # item -> the shared fixture it uses
    for item in items:
        for name in set(SHARED) & set(item.fixturenames):
            item.add_marker(pytest.mark.xdist_group(name))  # with --dist loadgroup
            group[item] = name
    first = {}  # a group moves as a whole, to its earliest member's place: its fixture is built once
    for item in items:
        g = group.get(item, item)
        first[g] = min(first.get(g, len(SLOW_FIRST)), rank.get(item.originalname, len(SLOW_FIRST)))
    order = {item: i for i, item in enumerate(items)}
    items.sort(key=lambda item: (first[group.get(item, item)], str(group.get(item, "")), order[item]))


def run_script(script, *argv, env=None, cwd=ROOT):
    """`python script argv` from the project's folder (or `cwd`), in this process: its exit status, stdout and stderr
    as the interpreter gives them (SystemExit("error: ...") printed with status 1, an exception as its traceback),
    without the ~10 s a fresh process pays for its imports. (What needs its own process, a kill or torchrun, starts
    one.)"""
    out, err, saved = io.StringIO(), io.StringIO(), (sys.argv, os.getcwd(), dict(os.environ))
    sys.argv = [script, *map(str, argv)]
    os.environ.update(env or {})
    os.chdir(cwd)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                runpy.run_path(str(ROOT / script), run_name="__main__")
                rc = 0
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
            except Exception:
                traceback.print_exc()
                rc = 1
    finally:
        sys.argv, (cwd, environ) = saved[0], saved[1:]
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environ)
    return subprocess.CompletedProcess([script, *argv], rc, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def tiny():
    """The real SmolLM2-135M-Instruct, loaded once for the whole session: (model, tokenizer)."""
    from support.lm import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def triplets(tmp_path_factory):
    """Real ALFWorld triplets: 2 training games, one random-policy episode of 5 steps each."""
    from collect import collect
    from collect import parse_args as collect_args

    out = tmp_path_factory.mktemp("collect")
    collect(
        collect_args(
            [
                "--policy",
                "random",
                "--split",
                "train",
                "--games",
                "2",
                "--episodes",
                "1",
                "--max-steps",
                "5",
                "--out",
                str(out),
            ]
        )
    )
    return out / "triplets.jsonl"
