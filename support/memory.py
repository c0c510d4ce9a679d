"""The memory plan: what one device holds while training, by arithmetic on the model's config (no weights
loaded). Every training script prints it before loading anything (`--dry-run` stops there) and shrinks its
batches to `--max-memory-gb`; bench/memory_plan.py checks it against measured peaks."""

import math
from pathlib import Path

import torch

from support.checks import check_disk, fail
from support.distributed import rank_world
from support.lm import CACHE_BLOCK, LORA_TARGETS, compiled_default, fused_experts, load_config, torch_dtype

_COUNTS = {}  # config (as JSON) -> (parameters, LoRA parameters a rank, fused expert parameters)


def param_counts(config):
    """(parameters, LoRA adapter parameters per unit of rank, parameters of fused experts) of `config`'s model,
    built once on the meta device: no memory used."""
    key = config.to_json_string()
    if key not in _COUNTS:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        experts = fused_experts(model)  # {name: parameters}: LoRA gives each expert r (in + out) of each
        _COUNTS[key] = (
            sum(p.numel() for p in model.parameters()),  # tied embeddings once
            sum(
                m.in_features + m.out_features
                for name, m in model.named_modules()
                if name.rsplit(".", 1)[-1] in LORA_TARGETS and isinstance(m, torch.nn.Linear)
            )
            + sum(p.shape[0] * (p.shape[1] + p.shape[2]) for n, p in model.named_parameters() if n in experts),
            sum(experts.values()),
        )
    return _COUNTS[key]


def count_params(config, lora_rank=0):
    """(parameters, LoRA adapter parameters) of `config`'s model: r (in + out) for each adapted projection, and for
    each fused expert weight [experts, out, in] of a mixture-of-experts model r (in + out) per expert
    (lora.LoRAExperts)."""
    n, per_rank, _ = param_counts(config)
    return n, lora_rank * per_rank


def active_params(config):
    """Parameters a token runs through: all of a dense model's; of a mixture-of-experts model, its experts'
    share top-k / experts (Qwen3-30B-A3B: 3.3B of 30.5B). What the time plan's compute counts."""
    n, _, experts = param_counts(config)
    routed = getattr(config, "num_experts_per_tok", 0) / max(1, getattr(config, "num_experts", 0) or 1)
    return n - experts + round(experts * routed)


def mlp_width(config):
    """Values a token keeps in an MLP's hidden layer: a dense layer's intermediate size; a mixture-of-experts layer
    runs top-k experts of moe_intermediate_size each."""
    if getattr(config, "num_experts", 0):
        return config.num_experts_per_tok * config.moe_intermediate_size
    return config.intermediate_size


def distinct_prompts(rows, group):
    """The most distinct prompts in a sampling batch of `rows` rows cut from a stream of prompts repeated `group`
    times in a row (lm.sample's chunks of `rows`, from row 0): the most groups one chunk touches."""
    period = group // math.gcd(rows, group) if rows else 0  # chunks repeat their alignment after this many
    return max((((i * rows + rows - 1) // group) - (i * rows // group) + 1 for i in range(period)), default=0)


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
    helpers=None,
    ddp=False,
    compiled=False,
):
    """Bytes of each part of a training run on one device, and its peak. The update's micro-batch holds
    `seq_len` tokens a sequence, `completion_len` of them scored; sampling runs `gen_batch` prompts of
    `prompt_len` tokens at once, `distinct` of them different (default: all; lm.sample prefills each
    distinct prompt once, so a group of G copies costs one prefill). Gradients live from the first backward
    to the optimizer step and are freed before sampling, so:
        peak = weights + reference + adapters + AdamW moments
               + max(gradients + activations + logits, KV cache + prefill)
    With FSDP over `shards` ranks, weights, gradients, moments and the reference are split, and sampling
    holds the whole weights (`full_weights`), so the peak is instead
        reference + adapters + moments
        + max(weights + gradients + activations + logits, whole weights + KV cache + prefill)
    Activations are counted op by op on a Llama/Qwen decoder layer (what autograd keeps for backward)
    and checked against measured peaks of the tiny model in tests/test_memory.py. `training=False`: a stage
    that only samples (collection, evaluation, the filter): weights + KV cache + prefill. `embedder`: (the bytes
    of an embedder loaded next to the model for the whole run, added to the peak; those of one batch it embeds,
    a phase of its own between sampling and the update) as reward.embedder_bytes gives them. `helpers`: the other models
    the run loads and samples from, {name: (config, dtype, prompt_len, new tokens)} (the judge, a fixed τ² user):
    their weights stay for the whole run, and their sampling (gen_batch distinct prompts) is a phase of its own,
    next to the model's. `ddp`: under torchrun without FSDP, DistributedDataParallel allocates gradient buckets
    as large as the trainable gradients when it wraps the model (torch/nn/parallel/distributed.py, the Reducer),
    held for the whole run. `compiled`: lm.sample's compiled path (RWML_COMPILE_DECODING=on): the static cache
    is rounded up to lm.CACHE_BLOCK tokens, and one layer's K and V repeated to the query heads' width
    (`decode_bytes`) stay in the CUDA graphs' memory pool."""
    B = torch.finfo(dtype).bits // 8
    n, n_lora = count_params(config, lora_rank)
    L, h, I, V = config.num_hidden_layers, config.hidden_size, mlp_width(config), config.vocab_size
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
    # a mixture-of-experts layer: the router's logits and each token's k routed copies of its input and outputs;
    # under LoRA each routed copy's gate_up and down adapters keep their fp32 inputs (lora.LoRAExperts)
    routed = config.num_experts + 2 * config.num_experts_per_tok * h if getattr(config, "num_experts", 0) else 0
    layer += routed * B
    if lora_rank and routed and B != 4:
        layer += config.num_experts_per_tok * (h + config.moe_intermediate_size) * 4
    if not training:
        micro_batch, reference, trainable = 0, False, 0
    tokens = micro_batch * seq_len
    context = prompt_len + completion_len
    if compiled:  # the static cache's length (lm.static_decoding)
        context = -(-context // CACHE_BLOCK) * CACHE_BLOCK
    activations = (
        tokens * (L * h * B + layer) if grad_checkpointing else tokens * L * layer
    )  # checkpointing: layer inputs + one layer
    plan = dict(
        weights=n * B // shards,
        adapters=n_lora * 4 // shards,  # LoRA's A and B, fp32 (lora.LoRALinear)
        reference=n * B // shards if reference and not lora_rank else 0,  # LoRA: the same weights with adapters off
        grads=trainable * tb // shards,
        adam=2 * trainable * tb // shards,
        activations=activations,
        logits=micro_batch * (completion_len + 1) * V * (B + 4),  # logits and their fp32 copy (lm.TokenLogProbs)
        kv_cache=gen_batch * context * L * 2 * kv * B,
        prefill=(distinct or gen_batch) * prompt_len * (4 * h + 3 * I + routed) * B,  # one layer's MLP over the prompts
    )
    if compiled:
        plan["kv_repeat"] = gen_batch * context * 2 * q * B
    if ddp:
        plan["ddp_buckets"] = trainable * tb
    if embedder:
        plan["embedder"], plan["embedding"] = embedder
    helper_sampling = 0  # the largest sampling phase of a helper model
    for name, (hconfig, hdtype, hprompt, hnew) in (helpers or {}).items():
        part = memory_plan(hconfig, hdtype, gen_batch=gen_batch, prompt_len=hprompt, seq_len=hprompt + hnew,
                           completion_len=hnew, training=False)  # fmt: skip
        plan[name] = part["weights"]
        helper_sampling = max(helper_sampling, part["kv_cache"] + part["prefill"])
    sampling = n * B if shards > 1 else 0  # FSDP gathers the whole weights to sample
    plan["peak"] = (
        sum(plan[k] for k in ("embedder", "ddp_buckets", *(helpers or {})) if k in plan)
        + plan["reference"]
        + plan["adapters"]
        + plan["adam"]
        + max(
            plan["weights"] + plan["grads"] + plan["activations"] + plan["logits"],
            max(plan["weights"], sampling) + plan["kv_cache"] + plan["prefill"] + plan.get("kv_repeat", 0),
            plan["weights"] + helper_sampling,
            plan["weights"] + plan.get("embedding", 0),
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
    group=1,
    helpers=None,
    grow_to=None,
):
    """Print the run's memory plan (sequences of prompt_len + completion_len tokens, `micro_batch` of them per
    forward/backward, `gen_batch` sampled at once) and return (micro_batch, gen_batch) halved, the larger phase
    first, until it fits in max_memory_gb (default: the card's memory on CUDA, no limit on CPU). A plan that cannot
    fit is a one-line error; dry_run stops after printing, and prints the time plan of `work` (`time_plan`) first.
    `reference`: whether a frozen reference copy is held (full fine-tuning with beta > 0); `embedder`: the bytes of an
    embedder the run loads and of one batch it embeds (reward.embedder_bytes); training=False: a stage that only
    samples. `group`: rows of each prompt in a sampling batch (RWML's G, the filter's K), whose prefill lm.sample runs
    once. `helpers`: {name: (model, dtype, prompt_len, new tokens)} of the other models the run loads and samples
    (`helper_models`). `grow_to`: with a budget (a card or max_memory_gb), micro_batch is doubled while the plan still
    fits, up to that many sequences (an update's on this rank): fewer, larger passes on a large card."""
    config = load_config(model)
    seq_len = prompt_len + completion_len
    torch_type = torch_dtype(dtype)
    budget = memory_budget(max_memory_gb)
    world = rank_world()[1]
    others = {k: (load_config(m), torch_dtype(d), p, c) for k, (m, d, p, c) in (helpers or {}).items()}

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
            distinct_prompts(gen_batch, group),
            training=training,
            embedder=embedder,
            helpers=others,
            ddp=training and world > 1 and not fsdp,
            compiled=compiled_default() and not fsdp,
        )

    p = plan()
    while p["peak"] > budget and (micro_batch > 1 or gen_batch > 1):
        train = p["grads"] + p["activations"] + p["logits"]
        sampling = p["kv_cache"] + p["prefill"] + p.get("kv_repeat", 0)
        if training and ((train >= sampling and micro_batch > 1) or gen_batch == 1):
            micro_batch //= 2
        else:
            gen_batch //= 2
        p = plan()
    while training and grow_to and micro_batch * 2 <= grow_to and p["peak"] <= budget < float("inf"):
        micro_batch *= 2
        p = plan()
        if p["peak"] > budget:  # one doubling too many
            micro_batch //= 2
            p = plan()
            break
    if rank_world()[0] == 0:
        tune = (f"LoRA r {lora_rank}" if lora_rank else "full fine-tuning") if training else "sampling only"
        print(
            f"memory plan ({model}, {str(torch_type).split('.')[-1]}, {tune}"
            f"{', gradient checkpointing' if grad_checkpointing and training else ''}"
            f"{f', FSDP over {world}' if fsdp else ''}; "
            + (f"micro-batch {micro_batch} x {seq_len} tokens, " if training else "")
            + f"sampling {gen_batch} x {prompt_len} + {completion_len}"
            + (f", {distinct_prompts(gen_batch, group)} distinct" if group > 1 else "")
            + f"{', compiled decoding' if compiled_default() and not fsdp else ''}), GB per device"
            + (f" (budget {budget / 1e9:.1f}):" if budget < float("inf") else ":")
        )
        print("  " + "  ".join(f"{k} {v / 1e9:.2f}" for k, v in p.items()))
        print(
            f"  (every sequence planned at its longest, {prompt_len} + {completion_len} tokens: an upper bound for "
            "shorter ones; the arithmetic is within 15% of measured peaks, tests/test_memory.py)"
        )
    if p["peak"] > budget:
        models = ("weights", "reference", "embedder", *others)
        fail(
            f"the plan needs {p['peak'] / 1e9:.1f} GB even with micro-batch 1 and one sequence sampled at a time "
            f"(models: {', '.join(f'{k} {p[k] / 1e9:.1f}' for k in models if p.get(k))} GB), over the budget of "
            f"{budget / 1e9:.1f} GB (--max-memory-gb): try --lora-rank, --grad-checkpointing "
            "or shorter sequences"
        )
    if dry_run:
        if work and rank_world()[0] == 0:
            time_plan(config, torch_type, work(micro_batch, gen_batch), lora_rank, grad_checkpointing,
                      compiled=compiled_default() and not fsdp)  # fmt: skip
        raise SystemExit(0)
    return micro_batch, gen_batch


def checkpoint_bytes(model, dtype, lora_rank):
    """(weights, AdamW state) bytes of one checkpoint, by arithmetic on the config: the weights in the run's dtype
    (LoRA: merged and saved in fp32, lora.merged_state_dict), and AdamW's two moments of the trained parameters
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
    batch,
    model,
    dtype,
    prompt_len,
    completion_len,
    max_memory_gb,
    dry_run,
    cpu=CPU_BATCH,
    embedder=0,
    work=None,
    group=1,
    helpers=None,
):
    """The prompts a sampling-only stage (collection, evaluation, the filter) runs at once: with a memory budget
    (--max-memory-gb, or the card on CUDA), `batch` (its flag; default CARD_BATCH) halved until the plan fits;
    without one (CPU), `batch` or `cpu`. Prints the plan when it sizes the batch or under dry_run (which prints
    the time plan of `work` too, then exits). `group` and `helpers` as fit_memory's."""
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
        group=group,
        helpers=helpers,
    )[1]


def scoring_batch(model, dtype, rows, group, prompt_len, completion_len):
    """Rows of distinct prompts (RWML's held-out scoring) to sample at once in the memory that a batch of `rows`
    rows in groups of `group` (RWML's sampling, as fit_memory planned it) takes: `rows` halved until their KV cache
    and prefill are no more than that batch's."""
    config = load_config(model) if isinstance(model, str) else model
    part = lambda b, d: memory_plan(config, torch_dtype(dtype), gen_batch=b, distinct=d, prompt_len=prompt_len,
                                    seq_len=prompt_len + completion_len, completion_len=completion_len,
                                    training=False)  # fmt: skip
    room, b = part(rows, distinct_prompts(rows, group)), rows
    while b > 1 and part(b, b)["kv_cache"] + part(b, b)["prefill"] > room["kv_cache"] + room["prefill"]:
        b //= 2
    return b


def helper_models(
    env=None, user_model="local", judge_model=None, dtype="auto", prompt_len=0, new_tokens=0, judge_tokens=0
):
    """fit_memory's `helpers` of a run: a fixed local τ² user (--env tau2 --user-model local:MODEL: its weights, and
    its own sampling of the users' turns at `prompt_len` + `new_tokens`) and an LLM judge (train_wm.py --reward
    judge*: its weights, and its scoring of gen_batch predictions: a prompt that holds the prediction, `prompt_len`
    + `new_tokens` at most, and `judge_tokens` new tokens, its analysis and score)."""
    helpers = {}
    if env == "tau2" and user_model.startswith("local:"):
        helpers["τ² user"] = (user_model.removeprefix("local:"), dtype, prompt_len, new_tokens)
    if judge_model:
        helpers["judge"] = (judge_model, dtype, prompt_len + new_tokens, judge_tokens)
    return helpers


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


TF32_SHARE = 0.5  # fp32 weights on CUDA compute in TF32 (lm.tf32_matmuls): H100/H200 495 dense TFLOPS, bf16 990


def decode_bytes(config, dtype, rows, context, path="eager", new_tokens=0):
    """Bytes a decoding step of `rows` rows whose KV cache holds `context` tokens a row (prompt + new tokens)
    moves, by path:
    eager (lm.sample's default): the weights once (a mixture-of-experts model: the experts its rows x top-k routed
      slots reach, grouped: each once, `lm.grouped_experts`) and the cache, allocated for all `context` tokens, once
      (a GQA model's decode step packs the query heads onto the key/value heads:
      transformers/integrations/sdpa_attention.py `pack_gqa`); its token's K and V are written in place;
    dynamic (lm.sample's static=False, transformers' DynamicCache): the weights once and the filled cache (on
      average context - new_tokens / 2 tokens) three times: read and written by its concatenation, read again;
    compiled (RWML_COMPILE_DECODING=on): the static cache, `context` rounded up to lm.CACHE_BLOCK, read at the
      key/value width, then its copy repeated to the query heads' width (`repeat_kv`: written once, read once);
    batched_mm (transformers' own switch for a mixture-of-experts model's decoding on a GPU, which lm.sample
      undoes): besides the eager path's, one expert's weights copied for each of rows x top-k routed slots, written
      once and read once, in every layer."""
    B = torch.finfo(dtype).bits // 8
    L, h = config.num_hidden_layers, config.hidden_size
    hd = getattr(config, "head_dim", None) or h // config.num_attention_heads
    kv = L * 2 * config.num_key_value_heads * hd * B  # bytes a token
    n, _, experts = param_counts(config)
    E, k = getattr(config, "num_experts", 0), getattr(config, "num_experts_per_tok", 0)
    reached = 1 - (1 - k / E) ** rows if E else 1  # the expected share of a layer's experts its rows reach
    weights = (n - experts + experts * reached) * B
    if path == "compiled":
        context = -(-context // CACHE_BLOCK) * CACHE_BLOCK
        return weights + rows * context * (kv + 2 * L * 2 * config.num_attention_heads * hd * B)
    if path == "dynamic":
        return weights + 3 * rows * (context - new_tokens / 2) * kv
    gathered = 2 * rows * k * 3 * config.moe_intermediate_size * h * B * L if path == "batched_mm" and E else 0
    return weights + rows * context * kv + gathered


def time_plan(config, dtype, phases, lora_rank=0, grad_checkpointing=False, kind=None, show=True, compiled=False):
    """Expected seconds of each phase and their sum. `phases`: {name: dict(prefill=prompt tokens, steps=decoding
    steps, rows=rows a step, context=tokens of a row's KV cache, train=tokens through forward + backward)}.
        prefill: tokens x active parameters / rate;  decode: steps x decode_bytes / rate;
        train: tokens x active parameters / rate
    The rates are RATES[kind] (default: this machine's), measured in bf16 on GPUs: fp32 weights compute at
    TF32_SHARE of them. Active parameters: a mixture-of-experts model's token runs top-k of its experts
    (`active_params`). `compiled`: decoding on the compiled path. Printed as the time plan under the memory plan."""
    kind = kind or device_kind()
    rate, n = RATES[kind], active_params(config)
    compute = TF32_SHARE if kind != "cpu" and dtype == torch.float32 else 1.0
    out = {}
    for name, w in phases.items():
        step = decode_bytes(config, dtype, w.get("rows", 1), w.get("context", 0), "compiled" if compiled else "eager")
        out[name] = dict(
            prefill=w.get("prefill", 0) * n / (rate["prefill"] * compute),
            decode=w.get("steps", 0) * step / rate["decode"],
            train=w.get("train", 0) * n / (rate["train"] * compute),
        )
    total = sum(sum(v.values()) for v in out.values())
    if show:
        precision = " (fp32 as TF32)" if compute != 1 else ""
        print(f"time plan ({kind} rates{precision}, support/memory.py RATES): {total / 3600:.2f} h")
        for name, v in out.items():
            print(f"  {name}: " + "  ".join(f"{k} {s / 3600:.2f} h" for k, s in v.items()))
    return out, total


def plan_wm(args, prompt_len, embedder, train, heldout):
    """train_wm's memory plan (prints it, and under --dry-run the time plan, and exits): --micro-batch and --gen-batch
    halved until it fits --max-memory-gb (default: the card's memory on CUDA); --micro-batch not given: from 8, and
    doubled while it fits on a card. --gen-batch not given: 64 on CPU; with a budget, a whole RWML step's G x batch
    predictions (the filter, SFT's held-out scoring: up to CARD_BATCH) halved until it fits. `prompt_len`: the
    longest prompt in tokens; `embedder`: reward.embedder_bytes."""
    new, rwml, held = args.max_new_tokens, args.mode == "rwml", len(heldout[: args.val_size])

    def sampled(prompts, rows, gb, times=1):  # the time plan's figures of sampling `rows` rows of `prompts` prompts
        steps = times * math.ceil(rows / gb) * new
        return dict(prefill=times * prompts * prompt_len, steps=steps, rows=min(rows, gb), context=prompt_len + new)

    if args.mode == "filter":
        work = lambda mb, gb: {"filter": sampled(len(train), len(train) * args.filter_k, gb)}
        args.gen_batch = sampling_batch(
            args.gen_batch,
            args.model,
            args.dtype,
            prompt_len,
            new,
            args.max_memory_gb,
            args.dry_run,
            64,
            embedder,
            work,
            group=args.filter_k,  # each triplet's K predictions share one prefill
        )
        return
    if args.gen_batch is None:
        args.gen_batch = (args.batch_size * args.group_size if rwml else CARD_BATCH) if has_budget(args) else 64
    steps = args.max_steps or math.ceil(args.epochs * math.ceil(len(train) / args.batch_size))
    evals = steps // args.eval_every + (0 if args.no_start_eval else 1)
    rows = args.batch_size * (args.group_size if rwml else 1)

    # the held-out scoring's prompts are all distinct: as many at once as fit where RWML's groups did (CPU: gen_batch)
    score = lambda gb: scoring_batch(args.model, args.dtype, gb, args.group_size, prompt_len, new)
    score_batch = lambda gb: score(gb) if rwml and has_budget(args) else gb

    def work(mb, gb):  # the time plan: RWML's G predictions a triplet, every update, the held-out scoring
        phases = {"RWML sampling": sampled(args.batch_size, rows, gb, steps)} if rwml else {}
        phases["updates"] = dict(train=steps * rows * (prompt_len + new) * (args.ppo_epochs if rwml else 1))
        phases["held-out scoring"] = sampled(held, held, score_batch(gb), evals)
        return phases

    judge_model = args.judge_model if rwml and args.reward != "embedding" else None  # loaded beside the model
    args.micro_batch, args.gen_batch = fit_memory(
        args.model,
        args.dtype,
        args.lora_rank,
        rwml and args.beta > 0,
        args.grad_checkpointing,
        args.micro_batch,
        args.gen_batch,
        prompt_len,
        new,
        args.fsdp,
        args.max_memory_gb,
        args.dry_run,
        embedder=embedder,
        work=work,
        group=args.group_size if rwml else 1,  # a triplet's G predictions share one prefill
        helpers=helper_models(
            judge_model=judge_model,
            dtype=args.dtype,
            prompt_len=prompt_len,
            new_tokens=new,
            judge_tokens=args.judge_max_new_tokens,
        ),
        grow_to=-(-rows // rank_world()[1]) if args.fit_micro_batch else None,  # an update's sequences on this rank
    )
    args.score_batch = score_batch(args.gen_batch)
    check_checkpoint_disk(args.out, args.model, args.dtype, args.lora_rank)  # what its checkpoints will take


def has_budget(args):
    """Whether the run has a memory budget to size its batches by: --max-memory-gb, or a CUDA card."""
    return memory_budget(args.max_memory_gb) < float("inf")


def plan_policy(args, games, prompt_len):
    """train_policy's memory plan (and under --dry-run its time plan, then exit): --micro-batch and --batch-games halved
    until it fits (--micro-batch not given: from 8, and doubled while it fits on a card). Policy RL: --updates rounds
    of G x games-per-step episodes; RFT: one round of N episodes of each of `games`, then SFT on (at most) all their
    turns; every episode planned to --max-steps."""
    if args.method == "rft":
        rounds, episodes, passes = 1, games * args.rft_episodes, args.rft_epochs
        most = args.rft_batch  # turns of an SFT step
    else:
        rounds, episodes, passes = args.updates, args.games_per_step * args.group_size, args.ppo_epochs
        most = episodes * args.max_steps  # turns of an update, at most

    def work(mb, gb):  # the time plan, every episode to --max-steps (an upper bound): rollouts, then the updates
        turns = rounds * episodes * args.max_steps
        calls = rounds * math.ceil(episodes / gb) * args.max_steps
        return {
            "rollouts": dict(
                prefill=turns * prompt_len,
                steps=calls * args.max_new_tokens,
                rows=min(episodes, gb),
                context=prompt_len + args.max_new_tokens,
            ),
            "updates": dict(train=turns * (prompt_len + args.max_new_tokens) * passes),
        }

    args.micro_batch, args.batch_games = fit_memory(
        args.model,
        args.dtype,
        args.lora_rank,
        args.beta > 0 and args.method == "grpo",  # RFT has no reference model
        args.grad_checkpointing,
        args.micro_batch,
        args.batch_games,
        prompt_len,
        args.max_new_tokens,
        args.fsdp,
        args.max_memory_gb,
        args.dry_run,
        work=work,
        helpers=helper_models(args.env, args.user_model, None, args.dtype, prompt_len, args.user_max_new_tokens),
        grow_to=-(-most // rank_world()[1]) if args.fit_micro_batch else None,  # an update's sequences on this rank
    )
    check_checkpoint_disk(args.out, args.model, args.dtype, args.lora_rank)  # what its checkpoints will take
