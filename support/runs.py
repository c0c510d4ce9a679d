"""What a run writes and reads back: seeds, JSONL records (one object a line, whole lines only), the
records a resumed run keeps, and the metric curves every stage draws from its metrics.jsonl."""

import json
import os
import random
import shlex
import shutil
import signal
import sys
import threading
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from support.checks import fail, json_line
from support.distributed import rank_world
from support.schema import STEP_LOG, problem


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def read_jsonl(path, schema=None, required=()):
    """All records of a JSONL file, each checked against `schema` (support/schema.py: types, non-empty text,
    unique ids) and holding the fields `required`. Every violation is a one-line `error: FILE:LINE: ...`."""
    path = Path(path)
    if not path.exists():
        fail(f"{path} does not exist")
    rows, seen = [], {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                fail(f"{path}:{lineno}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"{path}:{lineno}: malformed JSON line ({e.msg})")
            if not isinstance(row, dict):
                fail(f"{path}:{lineno}: expected a JSON object")
            wrong = problem(row, schema, required) if schema else None
            missing = [k for k in required if k not in row]
            if wrong or missing:
                fail(f"{path}:{lineno}: {wrong or f'missing field {missing[0]!r}'}")
            if schema and schema.unique:
                key = row[schema.unique]
                if key in seen:
                    fail(
                        f"{path}:{lineno}: {schema.unique} {key!r} is already on line {seen[key]} "
                        f"(each {schema.name} once in a file: was it concatenated twice?)"
                    )
                seen[key] = lineno
            rows.append(row)
    return rows


def drop_partial_line(path):
    """Cut an unterminated last line (a run killed mid-write) so appending continues cleanly."""
    path = Path(path)
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def append_jsonl(f, rows):
    """Write whole lines in one call and flush, so a kill never leaves half a record behind (Ctrl-C waits for it)."""
    text = "".join(json_line(r) for r in rows)  # NaN / Infinity written as null: strict JSON
    main = threading.current_thread() is threading.main_thread() and hasattr(signal, "pthread_sigmask")
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if main else None
    try:
        f.write(text)
        f.flush()
    finally:
        if main:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a Ctrl-C meanwhile is raised now, after the lines


def write_jsonl(path, rows):
    """Replace a JSONL file whole (written aside, then renamed)."""
    tmp = Path(f"{path}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        append_jsonl(f, rows)
    os.replace(tmp, path)


def resume_jsonl(path, resume, keep=lambda row: True, schema=None, required=()):
    """The records a resumed run keeps of `path` (those `keep` accepts), the file rewritten to hold just them,
    after dropping an unterminated last line; without `resume` the file is removed and nothing is kept."""
    path = Path(path)
    if not resume:
        path.unlink(missing_ok=True)
        return []
    if not path.exists():
        return []
    drop_partial_line(path)
    rows = [r for r in read_jsonl(path, schema, required) if keep(r)]
    write_jsonl(path, rows)
    return rows


def open_step_log(path, resume, step):
    """A JSONL file of per-step lines (field `step`) opened for appending; on resume only the lines up to
    the checkpoint's step are kept, so replayed steps are not written twice. Under torchrun rank 0 writes."""
    if rank_world()[0] > 0:
        return open(os.devnull, "w")
    resume_jsonl(path, resume, keep=lambda m: m["step"] <= step, schema=STEP_LOG)
    return open(path, "a", encoding="utf-8")


def run_stage(main, args, checkpoint=None, resumable=True):
    """main(args) of a stage script. Ctrl-C ends it with one line instead of a traceback, exit status 130: where
    its last checkpoint is (or that its records in --out end on whole lines) and the command that continues it."""
    argv = ["python", *(a for a in sys.argv if a != "--resume")]  # now: ALFWorld's planner rewrites sys.argv
    # no "Loading weights" bars of transformers / huggingface_hub between the stage's own (read at their import)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        return main(args)
    except KeyboardInterrupt:
        found = newest_checkpoint(checkpoint) if checkpoint else None
        if found:
            step = torch.load(Path(found) / "trainer.pt", mmap=True, weights_only=False)["step"]
            where, resume = f"the last checkpoint is {found} (step {step})", True
        elif checkpoint:
            where, resume = f"no checkpoint yet in {checkpoint} (one every --save-every updates)", False
        else:
            where = f"its records in {args.out} end on whole lines" if resumable else "nothing to keep"
            resume = resumable
        how = f"continue with: {shlex.join(argv + ['--resume'])}" if resume else f"run it again: {shlex.join(argv)}"
        for bar in list(getattr(tqdm, "_instances", ())):  # the progress bars end their lines before it, not after
            bar.close()
        sys.stderr.write(f"interrupted: {where}; {how}\n")
        raise SystemExit(130) from None


# ---------------------------------------------------------------------------------------------
# Checkpoint folders: written aside and swapped in, so that a kill at any instant leaves a complete one
# ---------------------------------------------------------------------------------------------
def complete(folder):
    """A checkpoint folder is complete once it holds trainer.pt: written last, under another name, then renamed."""
    return (Path(folder) / "trainer.pt").exists()


def aside(folder, suffix):
    """folder.tmp (a save being written) or folder.old (the previous checkpoint during a swap)."""
    return Path(folder).with_name(f"{Path(folder).name}.{suffix}")


def remove_checkpoint(folder):
    """Delete a checkpoint folder, its trainer.pt first: a half-deleted folder never looks complete."""
    (Path(folder) / "trainer.pt").unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def swap_in(tmp, folder):
    """Put the complete checkpoint `tmp` in the place of `folder`. At every instant a complete checkpoint is
    under a name `find_checkpoint` reads: folder -> folder.old, tmp -> folder, then folder.old is deleted."""
    folder, old = Path(folder), aside(folder, "old")
    remove_checkpoint(old)
    if folder.exists():
        os.rename(folder, old)
    os.rename(tmp, folder)
    remove_checkpoint(old)


def newest_checkpoint(folder):
    """The newest complete one of folder.tmp (written whole, not yet swapped in), folder, folder.old; or None."""
    return next((f for f in (aside(folder, "tmp"), Path(folder), aside(folder, "old")) if complete(f)), None)


def find_checkpoint(folder):
    """The newest complete checkpoint of `folder`, or None: folder.tmp when a save was written whole but not yet
    swapped in (it is newer than folder), else folder, else folder.old (kept aside mid-swap). One found
    aside is put in the place of `folder` (the cut swap is finished), with one line saying so; returns `folder`."""
    folder = Path(folder)
    found = newest_checkpoint(folder)
    if found in (None, folder):
        return found
    print(f"--resume: {found.name} is the newest complete checkpoint (a save was cut short); it becomes {folder}")
    if found.name.endswith(".tmp"):
        swap_in(found, folder)
    else:
        remove_checkpoint(folder)
        os.rename(found, folder)
    return folder


def plot_metrics(jsonl_path, png_path=None, x="step", xlabel=None):
    """Turn a metrics JSONL into one PNG with a panel per numeric metric (x: `x`, else line index; its axis
    labelled `xlabel`, by default the name of x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(jsonl_path)
    keys = [
        k
        for k in dict.fromkeys(k for r in rows for k in r)
        if k != x and any(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for r in rows)
    ]
    png_path = Path(png_path or Path(jsonl_path).with_suffix(".png"))
    if not keys:
        return None
    cols = min(3, len(keys))
    n_rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(n_rows, cols, figsize=(4 * cols, 3 * n_rows), squeeze=False)
    # margins in inches (tight_layout measures every label: a third of the time of a 30-panel figure)
    w, h = 4 * cols, 3 * n_rows
    fig.subplots_adjust(left=0.7 / w, right=1 - 0.2 / w, bottom=0.5 / h, top=1 - 0.3 / h, wspace=0.3, hspace=0.4)
    for ax, k in zip(axes.flat, keys):
        pts = [(r.get(x, i), r[k]) for i, r in enumerate(rows) if isinstance(r.get(k), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel(xlabel or (x if any(x in r for r in rows) else "record"))
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
