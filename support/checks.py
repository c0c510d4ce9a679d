"""Bad input as one clear line, before any heavy work; no NaN in weights or JSONL.

Every stage script builds its command line with `parser` and gives each numeric flag its range as the
argparse `type` (`at_least(2, "GRPO normalises within a group")`, `fraction()`, ...), so a value out of range
stops the run while its arguments are parsed, with one line and exit status 2:

    error: --group-size must be ≥ 2 (GRPO normalises within a group), got 1

Errors found later (a missing file, a malformed JSONL line with its file:line, a model folder that does
not exist) are one `error: ...` line with exit status 1. `claim_out` keeps the runs of different stages
out of each other's folders, and `finite` is the guard the training loops use before an optimizer step.
"""

import argparse
import json
import math
import re
import shutil
from pathlib import Path


def fail(message):
    """Stop with one line on stderr and exit status 1."""
    raise SystemExit(f"error: {message}")


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one `error: ...` line (exit status 2), without the usage block."""

    def error(self, message):
        message = re.sub(r"^argument (--[\w-]+): must", r"\1 must", message)  # "--lr must be > 0, got 0"
        self.exit(2, f"error: {message}\n")


class DefaultsOnce(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default said once: argparse's "(default: X)" unless the help says its own default,
    or there is none to say (None; a switch, whose help says what it turns on)."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default is None or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


def parser(doc):
    """The command line of a stage script: its docstring's first paragraph as description, defaults in --help."""
    return OneLineParser(description=doc.split("\n\n")[0], formatter_class=DefaultsOnce)


# ---------------------------------------------------------------------------------------------
# Ranges of numeric flags, as argparse types (argparse shows the type's name when a value is no number)
# ---------------------------------------------------------------------------------------------
def ranged(kind, ok, text, why=None):
    """An argparse type: `kind(value)` that must satisfy `ok`, else "must be <text> (<why>), got <value>"."""

    def parse(value):
        try:
            v = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be {'an integer' if kind is int else 'a number'}, got {value!r}"
            ) from None
        if not (math.isfinite(v) and ok(v)):
            raise argparse.ArgumentTypeError(f"must be {text}{f' ({why})' if why else ''}, got {value}")
        return v

    parse.__name__ = kind.__name__
    return parse


def at_least(low=1, why=None):
    """An integer ≥ low (sizes, counts, steps; low=0 where 0 has a documented meaning)."""
    return ranged(int, lambda v: v >= low, f"≥ {low}", why)


def positive(why=None):
    """A number > 0 (learning rate, norms, budgets)."""
    return ranged(float, lambda v: v > 0, "> 0", why)


def non_negative(why=None):
    """A number ≥ 0 (temperature: 0 is greedy; KL coefficient: 0 is none)."""
    return ranged(float, lambda v: v >= 0, "≥ 0", why)


def fraction(why=None, below_one=False):
    """A probability or share in [0, 1] (or [0, 1) with below_one)."""
    return ranged(
        float,
        (lambda v: 0 <= v < 1) if below_one else (lambda v: 0 <= v <= 1),
        "in [0, 1)" if below_one else "in [0, 1]",
        why,
    )


def distance_threshold():
    """tau_d: the sim-to-real distance 1 - cos lies in [0, 2], and d < 0 never holds."""
    return ranged(float, lambda v: 0 < v <= 2, "in (0, 2]", "d = 1 - cos lies in [0, 2]")


# ---------------------------------------------------------------------------------------------
# Paths: models and output folders
# ---------------------------------------------------------------------------------------------
def check_model(name, tiny="smollm2-135m"):
    """A --model value names the tiny default, a local folder or a hub id. A path that does not exist is
    an error here; a hub id is tried when the model is loaded (grpo.load_config says if it cannot be
    fetched). Paths are told from hub ids ("org/name") by a leading / . ~ or by more than one "/"."""
    if name == tiny:
        return name
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            fail(f"model {name} is a file: give the folder that holds its config.json")
        return name
    if (path.parent / "trainer.pt").exists():  # a LoRA run's checkpoint before its last save: adapters only
        fail(f"model folder {name} does not exist: the run's LoRA adapters are saved, its merged weights only at its "
             "last update (--resume the run to its end)")  # fmt: skip
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        fail(f"model folder {name} does not exist")
    return name


MARKER = "run.json"  # in every --out folder: which stage wrote it


def claim_out(out, stage, resume=False):
    """Make --out this stage's folder. A file, or a folder holding another stage's run (named in its
    run.json), is an error whether or not --resume is given: records of two stages never mix. A rerun
    of the same stage without --resume starts over, as each script documents."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file, not a folder")
    marker = out / MARKER
    if marker.exists():
        try:
            other = json.loads(marker.read_text())["stage"]
        except (ValueError, KeyError, TypeError):
            fail(f"{marker}: unreadable (it names the stage that wrote {out})")
        if other != stage:
            fail(f"--out {out} holds a `{other}` run: give this `{stage}` run its own folder")
    out.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        marker.write_text(json.dumps(dict(stage=stage)) + "\n")
    return out


def check_disk(out, need, what):
    """Stop with one line when the disk that holds `out` has fewer than `need` bytes free; `what` says what they are."""
    folder = Path(out).resolve()
    while not folder.exists():  # the folder is made later: the disk of its nearest existing parent
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if need > free:
        fail(
            f"--out {out}: {free / 1e9:.2f} GB free on its disk, and this run writes up to {need / 1e9:.2f} GB "
            f"({what}): free some space or give an --out on another disk"
        )


# ---------------------------------------------------------------------------------------------
# Numbers: the guard before an optimizer step, and JSON without NaN
# ---------------------------------------------------------------------------------------------
MAX_SKIPPED_IN_A_ROW = 3  # non-finite updates in a row after which a run stops


def finite(*values):
    """True when every value is a finite number."""
    return all(math.isfinite(v) for v in values)


class SkipCounter:
    """Counts updates skipped for a non-finite loss or gradient norm; the run stops with an error naming
    the step after MAX_SKIPPED_IN_A_ROW of them in a row (the last checkpoint holds finite weights)."""

    def __init__(self):
        self.total, self.in_a_row = 0, 0

    def update(self, skipped):
        self.total += bool(skipped)
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        return self.total

    def check(self, step):
        if self.in_a_row >= MAX_SKIPPED_IN_A_ROW:
            fail(
                f"step {step}: the loss or gradient norm was not finite in {self.in_a_row} updates in a row "
                f"(steps {step - self.in_a_row + 1}-{step}); no weight was changed by them and no checkpoint "
                "was written from them: try a lower --lr"
            )


def json_safe(value):
    """`value` with every NaN / ±Infinity float replaced by None, so JSON lines hold null, never a bare NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_line(record):
    """One JSONL line (non-finite numbers written as null; strict JSON readers accept it)."""
    return json.dumps(json_safe(record), ensure_ascii=False, allow_nan=False) + "\n"
