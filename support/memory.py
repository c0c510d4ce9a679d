"""The memory plan: what one device holds while training, by arithmetic on the model's config (no weights
loaded). Every training script prints it before loading anything (`--dry-run` stops there) and shrinks its
batches to `--max-memory-gb`; bench/memory_plan.py checks it against measured peaks."""

from pathlib import Path

import torch

from support.checks import check_disk, fail
from support.distributed import rank_world
from support.lm import LORA_TARGETS, load_config, torch_dtype


def count_params(config, lora_rank=0):
    """(parameters, LoRA adapter parameters) of `config`'s model, built on the meta device: no memory used."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())  # tied embeddings once
    adapters = sum(
        lora_rank * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if name.rsplit(".", 1)[-1] in LORA_TARGETS and isinstance(m, torch.nn.Linear)
    )
    return total, adapters


def memory_plan(
    config,
    dtype=torch.bfloat16,
    lora_rank=0,
    reference=True,
    grad_checkpointing=False,
    micro_batch=8,
    seq_len=1024,
    completion_len=256,
    gen_batch=64,
    prompt_len=None,
    shards=1,
    distinct=None,
    training=True,
    embedder=0,
):
    """Bytes of each part of a training run on one device, and its peak. The update's micro-batch holds
    `seq_len` tokens a sequence, `completion_len` of them scored; sampling runs `gen_batch` prompts of
    `prompt_len` tokens at once, `distinct` of them different (default: all; lm.sample prefills each
    distinct prompt once, so a group of G copies costs one prefill). Gradients live from the first backward
    to the optimizer step and are freed before sampling, so:
        peak = weights + reference + AdamW moments + max(gradients + activations + logits, KV cache + prefill)
    With FSDP over `shards` ranks, weights, gradients, moments and the reference are split, and sampling
    holds the whole weights (`full_weights`), so the peak is instead
        reference + moments + max(weights + gradients + activations + logits, whole weights + KV cache + prefill)
    Activations are counted op by op on a Llama/Qwen decoder layer (what autograd keeps for backward)
    and checked against measured peaks of the tiny model in tests/test_memory.py. `training=False`: a stage
    that only samples (collection, evaluation, the filter): weights + KV cache + prefill. `embedder`: the bytes
    of an embedder loaded next to the model for the whole run, added to the peak."""
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
    if not training:
        micro_batch, reference, trainable = 0, False, 0
    tokens = micro_batch * seq_len
    activations = (
        tokens * (L * h * B + layer) if grad_checkpointing else tokens * L * layer
    )  # checkpointing: layer inputs + one layer
    plan = dict(
        weights=n * B // shards,
        reference=n * B // shards if reference and not lora_rank else 0,  # LoRA: the same weights with adapters off
        grads=trainable * tb // shards,
        adam=2 * trainable * tb // shards,
        activations=activations,
        logits=micro_batch * (completion_len + 1) * V * (B + 16),  # logits, their fp32 copy, backward's temporaries
        kv_cache=gen_batch * (prompt_len + completion_len) * L * 2 * kv * B,
        prefill=(distinct or gen_batch) * prompt_len * (4 * h + 3 * I) * B,  # one layer's MLP over the prompts at once
    )
    if embedder:
        plan["embedder"] = embedder
    sampling = n * B if shards > 1 else 0  # FSDP gathers the whole weights to sample
    plan["peak"] = (
        embedder
        + plan["reference"]
        + plan["adam"]
        + max(
            plan["weights"] + plan["grads"] + plan["activations"] + plan["logits"],
            max(plan["weights"], sampling) + plan["kv_cache"] + plan["prefill"],
        )
    )
    return plan


def peak_memory():
    """{"peak_gb": the most this process's tensors have held on its GPU so far} on CUDA, for the metrics
    lines next to the plan; {} on CPU."""
    return dict(peak_gb=torch.cuda.max_memory_allocated() / 1e9) if torch.cuda.is_available() else {}


CARD_SHARE = 0.9  # of the card's memory the plan may fill: the CUDA context and allocator fragmentation take the rest


def memory_budget(max_memory_gb=None):
    """Bytes the plan may fill: --max-memory-gb, else on CUDA CARD_SHARE of the card's memory, else (CPU) no limit."""
    if max_memory_gb:
        return max_memory_gb * 1e9
    if torch.cuda.is_available():
        return CARD_SHARE * torch.cuda.get_device_properties(0).total_memory
    return float("inf")


def fit_memory(
    model,
    dtype,
    lora_rank,
    reference,
    grad_checkpointing,
    micro_batch,
    gen_batch,
    prompt_len,
    completion_len,
    fsdp=False,
    max_memory_gb=None,
    dry_run=False,
    embedder=0,
    work=None,
    training=True,
):
    """Print the run's memory plan (sequences of prompt_len + completion_len tokens, `micro_batch` of them per
    forward/backward, `gen_batch` sampled at once) and return (micro_batch, gen_batch) halved, the larger phase
    first, until it fits in max_memory_gb (default: the card's memory on CUDA, no limit on CPU). A plan that cannot
    fit is a one-line error; dry_run stops after printing, and prints the time plan of `work` (`time_plan`) first.
    `reference`: whether a frozen reference copy is held (full fine-tuning with beta > 0); `embedder`: the bytes of
    an embedder the run loads (reward.embedder_bytes); training=False: a stage that only samples."""
    config = load_config(model)
    seq_len = prompt_len + completion_len
    torch_type = torch_dtype(dtype)
    budget = memory_budget(max_memory_gb)
    world = rank_world()[1]

    def plan():
        return memory_plan(
            config,
            torch_type,
            lora_rank,
            reference,
            grad_checkpointing,
            micro_batch,
            seq_len,
            completion_len,
            gen_batch,
            prompt_len,
            world if fsdp else 1,
            training=training,
            embedder=embedder,
        )

    p = plan()
    while p["peak"] > budget and (micro_batch > 1 or gen_batch > 1):
        train, sampling = p["grads"] + p["activations"] + p["logits"], p["kv_cache"] + p["prefill"]
        if training and ((train >= sampling and micro_batch > 1) or gen_batch == 1):
            micro_batch //= 2
        else:
            gen_batch //= 2
        p = plan()
    if rank_world()[0] == 0:
        tune = (f"LoRA r {lora_rank}" if lora_rank else "full fine-tuning") if training else "sampling only"
        print(
            f"memory plan ({model}, {str(torch_type).split('.')[-1]}, {tune}"
            f"{', gradient checkpointing' if grad_checkpointing and training else ''}"
            f"{f', FSDP over {world}' if fsdp else ''}; "
            + (f"micro-batch {micro_batch} x {seq_len} tokens, " if training else "")
            + f"sampling {gen_batch} x {prompt_len} + {completion_len}), GB per device"
            + (f" (budget {budget / 1e9:.1f}):" if budget < float("inf") else ":")
        )
        print("  " + "  ".join(f"{k} {v / 1e9:.2f}" for k, v in p.items()))
        print(
            f"  (every sequence planned at its longest, {prompt_len} + {completion_len} tokens: an upper bound for "
            "shorter ones; the arithmetic is within 15% of measured peaks, tests/test_memory.py)"
        )
    if p["peak"] > budget:
        fail(
            f"the plan needs {p['peak'] / 1e9:.1f} GB even with micro-batch 1 and one sequence sampled at a time, "
            f"over the budget of {budget / 1e9:.1f} GB (--max-memory-gb): try --lora-rank, --grad-checkpointing or "
            "shorter sequences"
        )
    if dry_run:
        if work and rank_world()[0] == 0:
            time_plan(config, torch_type, work(micro_batch, gen_batch), lora_rank, grad_checkpointing)
        raise SystemExit(0)
    return micro_batch, gen_batch


def checkpoint_bytes(model, dtype, lora_rank):
    """(weights, AdamW state) bytes of one checkpoint, by arithmetic on the config: the weights in the run's dtype
    (LoRA: merged and saved in fp32, grpo.merged_state_dict), and AdamW's two moments of the trained parameters
    (LoRA: the fp32 adapters only)."""
    n, n_lora = count_params(load_config(model), lora_rank)
    B = torch.finfo(torch_dtype(dtype)).bits // 8
    return n * (4 if lora_rank else B), 2 * (n_lora * 4 if lora_rank else n * B)


def check_checkpoint_disk(out, model, dtype, lora_rank):
    """Stop with one line unless --out's disk holds what the run writes at its peak: during a save the previous
    checkpoint and the new one, each weights + AdamW state (a checkpoint already in --out is replaced)."""
    weights, adam = checkpoint_bytes(model, dtype, lora_rank)
    there = sum(f.stat().st_size for f in Path(out).glob("checkpoint*/**/*") if f.is_file())
    check_disk(
        out,
        2 * (weights + adam) - there,
        f"two checkpoints during a save, each {weights / 1e9:.2f} GB of weights + {adam / 1e9:.2f} GB of AdamW state",
    )


CPU_BATCH = 8  # prompts sampled at once by a stage that only samples, on CPU (2 cores: the prefill dominates)
CARD_BATCH = 512  # the most a sampling-only stage starts from on a card, halved until its plan fits


def sampling_batch(
    batch, model, dtype, prompt_len, completion_len, max_memory_gb, dry_run, cpu=CPU_BATCH, embedder=0, work=None
):
    """The prompts a sampling-only stage (collection, evaluation, the filter) runs at once: with a memory budget
    (--max-memory-gb, or the card on CUDA), `batch` (its flag; default CARD_BATCH) halved until the plan fits;
    without one (CPU), `batch` or `cpu`. Prints the plan when it sizes the batch or under dry_run (which prints
    the time plan of `work` too, then exits)."""
    budget = memory_budget(max_memory_gb) < float("inf")
    if not dry_run and (batch is not None or not budget):
        return batch or cpu
    start = batch or (CARD_BATCH if budget else cpu)
    return fit_memory(
        model,
        dtype,
        0,
        False,
        False,
        1,
        start,
        prompt_len,
        completion_len,
        max_memory_gb=max_memory_gb,
        dry_run=dry_run,
        embedder=embedder,
        work=work,
        training=False,
    )[1]


# ---------------------------------------------------------------------------------------------
# The time plan: expected wall time of a run from its token counts and a device's measured rates
# ---------------------------------------------------------------------------------------------
# Rates per device kind, normalised by model size so that one row serves every model:
#   prefill, train: parameters x tokens a second (a forward over prompt tokens; a forward + backward pass of an
#     update, LoRA r 64 with gradient checkpointing, its reference pass included)
#   decode: bytes read a second by a decoding step (weights + the KV cache it attends over); `bandwidth`: the
#     card's limit, for the ratio bench/gpu_check.py prints.
# H100: docs/scaling.md's gpu_check run (Qwen2.5-7B-Instruct, 7.62e9 parameters, bf16, eager `generate`):
#   64 distinct prompts x 1,408 + 256 tokens in 17.9 s, 8 prompts x G 8 in 5.91 s -> prefill of the 78,848
#   more prompt tokens in 12.0 s (6,550 tokens/s), a step (64 rows, 20.9 GB read) 16.4 ms; an update of
#   2 x 2 x 1,664 tokens 1.3 s.
# H200: the H100's rates x 4.8 / 3.35 (bandwidth) for decoding, x 1 for prefill and training (the same compute):
#   an ESTIMATE, not measured. cpu: SmolLM2-135M fp32 on this project's 2-core machines (bench/README.md,
#   sample_throughput.py: 2,760 more prompt tokens in 2.9 s; 32 steps of 16 rows, 0.72 GB read, in 5.0 s),
#   train: prefill / 3 (a backward costs ~2 forwards; not measured).
RATES = {
    "H100": dict(prefill=6550 * 7.62e9, train=6656 / 1.3 * 7.62e9, decode=1.27e12, bandwidth=3.35e12),
    "H200": dict(prefill=6550 * 7.62e9, train=6656 / 1.3 * 7.62e9, decode=1.27e12 * 4.8 / 3.35, bandwidth=4.8e12),
    "cpu": dict(prefill=950 * 1.35e8, train=950 * 1.35e8 / 3, decode=0.72e9 / 0.157, bandwidth=None),
}


def device_kind():
    """The RATES row of this machine: the GPU's name when it has one measured (an unknown card: H100's rates,
    said so), else "cpu"."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0)
    kind = next((k for k in RATES if k in name), None)
    if kind is None:
        print(f"time plan: no rates measured on {name}; using the H100's")
    return kind or "H100"


def step_bytes(config, dtype, rows, context):
    """Bytes a decoding step reads: the weights once and the KV cache of `rows` rows of `context` tokens."""
    B = torch.finfo(dtype).bits // 8
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = config.num_hidden_layers * 2 * config.num_key_value_heads * hd * B  # bytes a token
    return count_params(config)[0] * B + rows * context * kv


def time_plan(config, dtype, phases, lora_rank=0, grad_checkpointing=False, kind=None, show=True):
    """Expected seconds of each phase and their sum. `phases`: {name: dict(prefill=prompt tokens, steps=decoding
    steps, rows=rows a step, context=mean tokens a row attends over, train=tokens through forward + backward)}.
        prefill: tokens x parameters / rate;  decode: steps x step_bytes / rate;  train: tokens x parameters / rate
    The rates are RATES[kind] (default: this machine's). Printed as the time plan under the memory plan."""
    kind = kind or device_kind()
    rate, n = RATES[kind], count_params(config)[0]
    out = {}
    for name, w in phases.items():
        out[name] = dict(
            prefill=w.get("prefill", 0) * n / rate["prefill"],
            decode=w.get("steps", 0)
            * step_bytes(config, dtype, w.get("rows", 1), w.get("context", 0))
            / rate["decode"],
            train=w.get("train", 0) * n / rate["train"],
        )
    total = sum(sum(v.values()) for v in out.values())
    if show:
        print(f"time plan ({kind} rates, support/memory.py RATES): {total / 3600:.2f} h")
        for name, v in out.items():
            print(f"  {name}: " + "  ".join(f"{k} {s / 3600:.2f} h" for k, s in v.items()))
    return out, total
