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
    sampling = n * B if shards > 1 else 0  # FSDP gathers the whole weights to sample
    plan["peak"] = (
        plan["reference"]
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
):
    """Print the run's memory plan (sequences of prompt_len + completion_len tokens, `micro_batch` of them per
    forward/backward, `gen_batch` sampled at once) and return (micro_batch, gen_batch) halved, the larger phase
    first, until it fits in max_memory_gb. A plan that cannot fit is a one-line error; dry_run stops after
    printing. `reference`: whether a frozen reference copy is held (full fine-tuning with beta > 0)."""
    config = load_config(model)
    seq_len = prompt_len + completion_len
    torch_type = torch_dtype(dtype)
    budget = max_memory_gb * 1e9 if max_memory_gb else float("inf")
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
        )

    p = plan()
    while p["peak"] > budget and (micro_batch > 1 or gen_batch > 1):
        train, sampling = p["grads"] + p["activations"] + p["logits"], p["kv_cache"] + p["prefill"]
        if (train >= sampling and micro_batch > 1) or gen_batch == 1:
            micro_batch //= 2
        else:
            gen_batch //= 2
        p = plan()
    if rank_world()[0] == 0:
        print(
            f"memory plan ({model}, {str(torch_type).split('.')[-1]}, "
            f"{f'LoRA r {lora_rank}' if lora_rank else 'full fine-tuning'}"
            f"{', gradient checkpointing' if grad_checkpointing else ''}{f', FSDP over {world}' if fsdp else ''}; "
            f"micro-batch {micro_batch} x {seq_len} tokens, sampling {gen_batch} x {prompt_len} + {completion_len}), "
            "GB per device:"
        )
        print("  " + "  ".join(f"{k} {v / 1e9:.2f}" for k, v in p.items()))
    if p["peak"] > budget:
        fail(
            f"the plan needs {p['peak'] / 1e9:.1f} GB even with micro-batch 1 and one sequence sampled at a time, "
            f"over --max-memory-gb {max_memory_gb}: try --lora-rank, --grad-checkpointing or shorter sequences"
        )
    if dry_run:
        raise SystemExit(0)
    return micro_batch, gen_batch


def checkpoint_bytes(model, dtype, lora_rank):
    """(weights, AdamW state) bytes of one checkpoint, by arithmetic on the config: the weights (adapters merged)
    in the run's dtype, and AdamW's two moments of the trained parameters (LoRA: the fp32 adapters only)."""
    n, n_lora = count_params(load_config(model), lora_rank)
    B = torch.finfo(torch_dtype(dtype)).bits // 8
    return n * B, 2 * (n_lora * 4 if lora_rank else n * B)


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
