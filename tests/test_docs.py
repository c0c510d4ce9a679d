"""Every command the docs show runs as written, as far as it is cheap, so that no doc drifts from the code. Each line
of a ```bash block of README.md and docs/*.md is found here (a new one is checked with no change to this file):
- `make ...` runs as `make -n ...`: the target exists and its variables expand;
- a stage script (`python X.py ...`, `torchrun ... X.py ...`) runs in this process with its flags as written,
  plus --dry-run: its checks and its memory and time plans, no weights loaded, nothing written. It runs in a
  folder where what it reads stands in: a model path or hub id is the tiny model (an embedder's: the offline
  MiniLM), a JSONL file real ALFWorld triplets (--heldout / --wm: of other games). Flags that do their work
  without a plan (--report, --calibrate, --score) are parsed only;
- a line elided with `...`, or a command of another program (NOT_RUN), is marked not run: a skip with the reason.
"""

import json
import re
import runpy
import shlex
import subprocess

import pytest

from conftest import ROOT, run_script
from reward import embedder_path
from support.lm import resolve_model
from support.runs import read_jsonl

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = {  # program -> why its commands are not run
    "pip": "it installs packages",
    "evalscope": "EvalScope, another project's tool (installed by the line above it)",
}
PARSE_ONLY = ("--report", "--calibrate", "--score")  # evaluate.py's modes that plan nothing: they read and write
MODEL_FLAGS = ("--model", "--forgetting", "--judge-model", "--user-model")
HELD_OUT_FLAGS = ("--heldout", "--wm")


def fenced_commands():
    """(doc:line, argv) of every command line of every ```bash block (`\\` continues a line; `#` starts a comment)."""
    for doc in DOCS:
        text = doc.read_text()
        for block in re.finditer(r"^```bash\n(.*?)^```", text, re.M | re.S):
            lines, i = block[1].split("\n"), 0
            while i < len(lines):
                first, line = i, lines[i]
                while line.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = line[:-1] + " " + lines[i]
                i += 1
                argv = shlex.split(line, comments=True)
                if argv:
                    yield f"{doc.relative_to(ROOT)}:{text[: block.start(1)].count(chr(10)) + first + 1}", argv


COMMANDS = list(fenced_commands())


def test_the_docs_show_commands():
    """The search finds the docs' commands (a test of the search above: the two of README's first block)."""
    assert [argv for where, argv in COMMANDS if where.startswith("README.md")][:2] == [
        ["make", "pipeline"],
        ["make", "test"],
    ]
    assert len(COMMANDS) > 20


def stand_ins(argv, folder, triplets):
    """Make what the command reads exist under `folder`, its working folder: model paths and hub ids as links to the
    tiny model, JSONL files as real triplets (those of --heldout and --wm renamed to other games)."""
    tiny, flag = resolve_model("smollm2-135m"), None
    for arg in argv:
        if arg.startswith("--"):
            flag = arg
            continue
        value = arg.rpartition("=")[2] if flag == "--model" else arg.removeprefix("local:")
        path = folder / value
        if "/" not in value or (ROOT / value).exists() or path.exists() or flag == "--out":
            continue
        if value.endswith(".jsonl"):  # 8 copies under other game names: enough for the docs' --val-size 64
            head = "other/" if flag in HELD_OUT_FLAGS else ""
            rows = [
                dict(t, id=f"{head}{k}/{t['id']}", game=f"{head}{k}/{t['game']}") for k in range(8) for t in triplets
            ]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(t) + "\n" for t in rows))
        elif flag in MODEL_FLAGS:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to(tiny, target_is_directory=True)
        elif flag == "--embedder":  # the paper's Qwen3-Embedding-8B: the offline MiniLM stands in
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to(embedder_path(), target_is_directory=True)


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_a_documented_command_runs_as_written(where, argv, triplets, tmp_path):
    if argv[0] == "make":
        r = subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, f"{where}: {shlex.join(argv)}\n{r.stderr}"
        return
    if argv[0] in NOT_RUN:
        pytest.skip(f"not run: {argv[0]}: {NOT_RUN[argv[0]]}")
    assert argv[0] in ("python", "torchrun"), f"{where}: {argv[0]} is neither a stage script nor in NOT_RUN"
    script = next(a for a in argv if a.endswith(".py"))
    args = argv[argv.index(script) + 1 :]
    assert (ROOT / script).is_file(), f"{where}: no {script}"
    if "..." in args:
        pytest.skip("not run: an elided command (...)")
    if any(a in PARSE_ONLY for a in args):
        runpy.run_path(str(ROOT / script))["parse_args"](args)  # argparse exits (status 2) on a flag it refuses
        return
    stand_ins(args, tmp_path, read_jsonl(triplets))
    cheap = args if "--help" in args or "--dry-run" in args else [*args, "--dry-run"]
    r = run_script(script, *cheap, cwd=tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, f"{where}: {shlex.join(argv)}\n{r.stderr[-3000:]}"
    assert r.stdout.strip(), where  # the plan, or --help
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("run.json"))  # nothing claimed
