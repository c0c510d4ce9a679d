"""The paper's protocol as `make pipeline BUDGET=paper` runs it (every command printed, none run): the chain of
stages and their inputs, the model it names, and the settings table of docs/stages.md against what it passes."""

import re
import runpy
import shlex
import subprocess

import pytest
from test_train_policy import make_commands

from conftest import ROOT

PAPER = {"alfworld": "Qwen/Qwen2.5-7B-Instruct", "tau2": "Qwen/Qwen3-8B"}


def protocol(env, out="out"):
    return make_commands("pipeline", "BUDGET=paper", f"ENV={env}", f"MODEL={PAPER[env]}", f"OUT={out}")


flag = lambda argv, name: argv[argv.index(name) + 1] if name in argv else None


@pytest.mark.parametrize("env", ["alfworld", "tau2"])
def test_the_protocol_chains_the_papers_stages_in_order_with_their_inputs(env):
    """collect -> split by game -> WM SFT of pi' on the 10% share -> filter with pi' -> RWML and WM SFT from the
    base model on the kept triplets -> held-out scores -> RFT, Policy RL x3 -> Table 1 -> forgetting (Sec. 3-4)."""
    commands, model = protocol(env), PAPER[env]
    head = lambda argv: " ".join(
        argv[:3]
        if argv[0] == "train_wm.py"
        else argv[:2]
        if argv[1] in ("--wm", "--calibrate", "--forgetting")
        else argv[:1]
    )
    calibrate = ["evaluate.py --calibrate"] if env == "alfworld" else []  # τ_d is the paper's 0.4 on τ²
    assert [head(a) for a in commands] == [
        "collect.py",
        *calibrate,
        "train_wm.py --mode split",
        "train_wm.py --mode sft",  # pi'
        "train_wm.py --mode filter",
        "train_wm.py --mode rwml",
        "train_wm.py --mode sft",  # the WM SFT baseline
        "evaluate.py --wm",
        *["train_policy.py"] * 4,  # RFT, then Policy RL from three starts
        "evaluate.py",
        "evaluate.py --forgetting",
    ]
    collect, split, pi, filt, rwml, sft, wm_eval, rft, *policies = [a for a in commands if "--calibrate" not in a][:11]
    assert (flag(rft, "--method"), flag(rft, "--model"), flag(rft, "--out")) == ("rft", model, "out/rft")
    eval_, forgetting = commands[-2:]
    assert flag(collect, "--model") == model and flag(collect, "--out") == "out/collect"
    assert flag(split, "--triplets") == "out/collect/triplets.jsonl" and flag(split, "--out") == "out/split"
    # pi': WM SFT of the base model on the 10% share; never evaluated
    assert (flag(pi, "--model"), flag(pi, "--triplets"), flag(pi, "--out")) == (
        model,
        "out/split/heldout.jsonl",
        "out/pi_prime",
    )
    # the filter: pi' scores the other 90%
    assert (flag(filt, "--model"), flag(filt, "--triplets"), flag(filt, "--heldout")) == (
        "out/pi_prime/checkpoint/model",
        "out/split/train.jsonl",
        "out/split/heldout.jsonl",
    )
    for arm in (rwml, sft):  # both arms from the base model, on what the filter kept, scored on pi''s share
        assert (flag(arm, "--model"), flag(arm, "--triplets"), flag(arm, "--heldout")) == (
            model,
            "out/filter/triplets.filtered.jsonl",
            "out/split/heldout.jsonl",
        )
    assert flag(rwml, "--group-size") == ("16" if env == "tau2" else None)  # None: the default 8
    assert flag(wm_eval, "--wm") == "out/split/heldout.jsonl"
    assert wm_eval[wm_eval.index("--model") + 1 :] == [
        f"Base={model}",
        "WM SFT=out/wm_sft/checkpoint/model",
        "RWML=out/rwml/checkpoint/model",
    ]
    starts = [flag(p, "--model") for p in policies]
    assert starts == [model, "out/wm_sft/checkpoint/model", "out/rwml/checkpoint/model"]
    trained = [  # Table 1's rows, in its order
        "RFT=out/rft/checkpoint/model",
        "Policy RL=out/policy_rl/checkpoint/model",
        "WM SFT=out/wm_sft/checkpoint/model",
        "RWML=out/rwml/checkpoint/model",
        "WM SFT + Policy RL=out/wm_sft_policy_rl/checkpoint/model",
        "RWML + Policy RL=out/rwml_policy_rl/checkpoint/model",
    ]
    assert eval_[eval_.index("--model") + 1 :] == [f"Base={model}", *trained]
    assert flag(forgetting, "--forgetting") == model and forgetting[forgetting.index("--model") + 1 :] == trained
    assert flag(forgetting, "--out") == "out/forgetting"


def test_a_paper_run_without_a_model_is_one_line():
    argv = ["make", "--no-print-directory", "-n", "pipeline", "BUDGET=paper"]  # (under `make test`: make[1])
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1
    assert "MODEL=Qwen/Qwen2.5-7B-Instruct" in r.stderr and "MODEL=Qwen/Qwen3-8B" in r.stderr


def settings_rows():
    """The rows of docs/stages.md's settings table: (setting, stage, [(flag, value), ...])."""
    text = (ROOT / "docs" / "stages.md").read_text()
    table = text[text.index("| Setting | Paper (section) | Stage | Project |") :].split("\n\n")[0].splitlines()[2:]
    rows = []
    for line in table:
        setting, _, stage, project, _ = [c.strip() for c in line.strip("|").split("|")]
        pairs = [tuple(m.split(None, 1)) for m in re.findall(r"`(--[a-z-]+ [^`]+)`", project)]
        rows.append((setting, stage, pairs))
    return rows


def effective(argv):
    """The flags a stage command runs with: its script's own parser on the argv (defaults filled in)."""
    return runpy.run_path(str(ROOT / argv[0]))["parse_args"](argv[1:])


def test_the_settings_table_agrees_with_make_n_pipeline_budget_paper():
    """Every `--flag value` of the table's Project column is what `make pipeline BUDGET=paper` runs that stage with:
    passed on its line, or its script's default where the line passes none."""
    rows = settings_rows()
    assert len(rows) >= 25 and sum(bool(pairs) for _, _, pairs in rows) >= 18
    commands = {env: protocol(env, "runs/pipeline") for env in PAPER}  # the table's paths: the default OUT
    checked = 0
    for setting, stage, pairs in rows:
        env = "tau2" if "ENV=tau2" in stage else "alfworld"
        words = stage.split("(")[0].split()
        modes = ("--wm", "--calibrate", "--forgetting", "--mode", "--method")
        lines = [a for a in commands[env] if a[: len(words)] == words and (len(words) > 1 or a[1] not in modes)]
        if not pairs or stage == "every stage":
            continue
        assert lines, f"{setting}: no `{stage}` command in make -n pipeline BUDGET=paper ENV={env}"
        for argv in lines:
            model = lambda x: PAPER[env] if x.startswith("runs/") and x.endswith("/model") else x  # not made by -n
            args = effective([model(x) for x in argv])
            for name, value in pairs:
                got = getattr(args, name[2:].replace("-", "_"))
                got = got if isinstance(got, list) else [got]
                assert [type(g)(v) for g, v in zip(got, shlex.split(value))] == got, (setting, name, argv)
                checked += 1
    assert checked >= 25
