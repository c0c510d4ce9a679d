"""The memory plan (support/memory.py: memory_plan) next to measured peaks, and the plan at paper scale.

    python bench/memory_plan.py            # tiny model: planned vs measured peak of one update and one sampling call
    python bench/memory_plan.py --paper    # the plan for Qwen2.5-7B-Instruct and Qwen3-8B (no download: configs below)

Measured = bytes of the tensors alive at once (PeakMemory below counts every storage an op creates until
it is freed; weights loaded before are added). On CUDA, torch.cuda.max_memory_allocated measures the same
thing; the CPU process size (RSS) does not, since the allocator keeps freed memory.
"""

import argparse
import copy
import os
import sys
import time
import types
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from grpo import grpo_update  # noqa: E402
from support.lm import checkpoint_activations, load_model, sample  # noqa: E402
from support.lora import LoRALinear, adapters_merged, add_lora  # noqa: E402
from support.memory import memory_plan  # noqa: E402
from support.runs import set_seed  # noqa: E402

# the paper's models, from their config.json on the HF hub (only the fields the plan reads)
PAPER_MODELS = {
    "Qwen/Qwen2.5-7B-Instruct": (
        "qwen2",
        dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
            tie_word_embeddings=False,
        ),
    ),
    "Qwen/Qwen3-8B": (
        "qwen3",
        dict(
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
            tie_word_embeddings=False,
        ),
    ),
    # Figure 4's scaling model: 128 experts of 768, 8 a token, in all 48 layers; 30.5B parameters, 3.3B active
    "Qwen/Qwen3-30B-A3B": (
        "qwen3_moe",
        dict(
            hidden_size=2048,
            intermediate_size=6144,
            moe_intermediate_size=768,
            num_experts=128,
            num_experts_per_tok=8,
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            vocab_size=151936,
            tie_word_embeddings=False,
        ),
    ),
}
DENSE = ["Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen3-8B"]  # the dense ones


class PeakMemory(TorchDispatchMode):
    """`with PeakMemory() as m:` -> m.peak: the most bytes of tensor storages created inside the block and
    alive at the same time (storages of tensors from before the block are not counted)."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def _free(self, key):
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live and key not in inputs:  # views of existing storages are not new
                    self.live[key] = storage.nbytes()
                    self.now += storage.nbytes()
                    weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.now)
        return out


def tensor_bytes(*models, optimizer=None):
    """Bytes of the models' weights and the optimizer's state (each storage once)."""
    tensors = [t for m in models if m is not None for t in m.state_dict().values()]
    tensors += [t for s in (optimizer.state.values() if optimizer else []) for t in s.values() if torch.is_tensor(t)]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


class BytesMoved(TorchDispatchMode):
    """`with BytesMoved() as m:` -> m.read, m.written: the bytes of the tensors every op takes and makes (views,
    which move nothing, left out; an embedding lookup reads the rows it returns, not the table; index_copy_, a
    static cache's update, moves its source rows, not the cache it writes them into), and m.ops: aten ops launched.
    A CPU count of what a GPU step moves through memory at least (memory.decode_bytes)."""

    def __enter__(self):
        self.read = self.written = self.ops = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        if any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns):
            return out  # a view
        size = lambda ts: sum(t.numel() * t.element_size() for t in tree_flatten(ts)[0] if isinstance(t, torch.Tensor))
        if func is torch.ops.aten.index_copy_.default:  # (cache, dim, index, source)
            self.read, self.written = self.read + size(args[2:]), self.written + size(args[3])
            return out
        self.written += size(out)
        self.read += size(out) if func is torch.ops.aten.embedding.default else size((args, kwargs))
        return out


class Peak:
    """`with Peak(device, *models, optimizer=...) as p:` -> p.bytes, the most bytes of tensors alive at once
    (CUDA: torch.cuda.max_memory_allocated; CPU: the models' and optimizer's tensors + PeakMemory's peak),
    and p.seconds."""

    def __init__(self, device, *models, optimizer=None):
        self.device, self.models, self.optimizer = torch.device(device), models, optimizer

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.before, self.mode = tensor_bytes(*self.models, optimizer=self.optimizer), PeakMemory()
            self.mode.__enter__()
        self.t0 = time.time()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated()
        else:
            self.mode.__exit__(*exc)
            self.bytes = self.before + self.mode.peak
        self.seconds = time.time() - self.t0


def measure_update(
    dtype="fp32",
    lora_rank=0,
    beta=0.0,
    grad_checkpointing=False,
    micro_batch=2,
    prompt_len=192,
    completion_len=64,
    seed=0,
    model=None,
):
    """(measured, planned, seconds) of a GRPO update of `model` (default: the tiny one in `dtype` on CPU) once
    AdamW's moments exist, as in every update after the first, over two micro-batches (the second forward runs
    with the first one's gradients). beta > 0 with full fine-tuning holds a frozen reference copy."""
    set_seed(seed)
    model = model or load_model(dtype=dtype, device="cpu")[0]
    ref = copy.deepcopy(model).requires_grad_(False) if beta > 0 and not lora_rank else None
    params = add_lora(model, lora_rank) if lora_rank else list(model.parameters())
    if grad_checkpointing:
        checkpoint_activations(model)
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
    g = torch.Generator().manual_seed(seed)
    n_seqs, V = 2 * micro_batch, model.config.vocab_size
    seqs = [
        (
            torch.randint(1, V, (prompt_len,), generator=g).tolist(),
            torch.randint(1, V, (completion_len,), generator=g).tolist(),
        )
        for _ in range(n_seqs)
    ]
    args = types.SimpleNamespace(
        micro_batch=micro_batch, ppo_epochs=1, clip_eps=0.2, beta=beta, max_grad_norm=1.0, token_mean=True
    )
    adv = torch.linspace(-1, 1, n_seqs)
    if model.device.type == "cuda":  # a whole update first: the timed one does not pay CUDA's first-call set-up
        grpo_update(model, optimizer, seqs, adv, args, ref)
    else:  # AdamW makes its moments at its first step: one on zero gradients (a CPU update takes ~10-20 s)
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with Peak(model.device, model, ref, optimizer=optimizer) as p:
        grpo_update(model, optimizer, seqs, adv, args, ref)
    planned = memory_plan(
        model.config,
        model.dtype,
        lora_rank,
        ref is not None,
        grad_checkpointing,
        micro_batch,
        prompt_len + completion_len,
        completion_len,
        gen_batch=0,
    )
    return p.bytes, planned["peak"], p.seconds


def measure_sample_call(model, tok, prompts, completion_len, n=1, compiled=None, lora_rank=0, static=True):
    """(measured, planned, sampled tokens/s) of one `lm.sample` call: each prompt n times, completion_len
    tokens a row (the end-of-sequence token switched off); `compiled` and `static` as lm.sample's; `lora_rank`: the
    rank of the adapters the model carries (add_lora), sampled as RWML and Policy RL do: folded into the weights
    (lora.adapters_merged), the merge inside the measured peak."""
    model.generation_config.eos_token_id = None  # every row writes completion_len tokens
    with Peak(model.device, model) as p, adapters_merged(model):
        out = sample(model, tok, prompts, completion_len, 1.0, n=n, compiled=compiled, static=static)
    P = max(len(tok(q, add_special_tokens=False)["input_ids"]) for q in prompts)
    rows, n = len(out), len(set(prompts))
    plan = memory_plan(model.config, model.dtype, lora_rank, False, False, 1, 1, completion_len, rows, P, distinct=n)
    planned = plan["weights"] + plan["adapters"] + plan["kv_cache"] + plan["prefill"]
    return p.bytes, planned, sum(len(c) for _, c, _ in out) / p.seconds


def measure_sampling(gen_batch=8, prompt_len=256, completion_len=32, seed=0, dtype="fp32", lora_rank=0):
    """(measured, planned) peak bytes of one batched `sample` call of the tiny model on CPU: gen_batch random
    prompts of prompt_len tokens; with `lora_rank`, with adapters (B random, as after some updates)."""
    set_seed(seed)
    model, tok = load_model(dtype=dtype, device="cpu")
    if lora_rank:
        add_lora(model, lora_rank)
        for m in model.modules():
            if isinstance(m, LoRALinear):
                torch.nn.init.normal_(m.B, std=0.02, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed)
    prompts = [tok.decode(torch.randint(100, 40000, (prompt_len,), generator=g)) for _ in range(gen_batch)]
    prompts = [tok.decode(tok(p, add_special_tokens=False)["input_ids"][:prompt_len]) for p in prompts]
    return measure_sample_call(model, tok, prompts, completion_len, lora_rank=lora_rank)[:2]


def paper_table(seq_len, completion_len, micro_batch, gen_batch):
    from transformers import AutoConfig

    rows, head = [], list(memory_plan(AutoConfig.for_model("qwen2", **PAPER_MODELS[DENSE[0]][1])))
    for name, (kind, fields) in PAPER_MODELS.items():
        config = AutoConfig.for_model(kind, **fields)
        for label, dtype, rank, ckpt, shards in [  # full fine-tuning in bf16 is refused (training.check_precision)
            ("LoRA r 64, bf16", torch.bfloat16, 64, False, 1),
            ("LoRA r 64, bf16, checkpointing", torch.bfloat16, 64, True, 1),
            ("full, fp32 (paper: lr 1e-6), checkpointing", torch.float32, 0, True, 1),
            ("full, fp32, checkpointing, FSDP over 4", torch.float32, 0, True, 4),
            ("full, fp32, checkpointing, FSDP over 8", torch.float32, 0, True, 8),
        ]:
            p = memory_plan(
                config, dtype, rank, True, ckpt, micro_batch, seq_len, completion_len, gen_batch, shards=shards
            )
            rows.append(f"| {name} | {label} | " + " | ".join(f"{p[k] / 1e9:.1f}" for k in head) + " |")
    print(
        f"GB per device; micro-batch {micro_batch} x {seq_len} tokens ({completion_len} scored), "
        f"sampling {gen_batch} prompts x {seq_len - completion_len} + {completion_len} tokens; "
        "FSDP: weights, reference, grads, adam per rank, the whole weights while sampling"
    )
    print("| model | fine-tuning | " + " | ".join(head) + " |")
    print("|---" * (len(head) + 2) + "|")
    print("\n".join(rows))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--paper", action="store_true", help="print the plan for the paper's 7-8B models instead")
    p.add_argument(
        "--seq-len", type=int, default=1664, help="--paper: tokens per trained sequence (policy turn ~1,400 + 256)"
    )
    p.add_argument("--completion-len", type=int, default=256, help="--paper: tokens written per turn")
    p.add_argument("--micro-batch", type=int, default=2, help="--paper: sequences per forward/backward")
    p.add_argument("--gen-batch", type=int, default=64, help="--paper: prompts sampled at once")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    args = p.parse_args()
    if args.paper:
        return paper_table(args.seq_len, args.completion_len, args.micro_batch, args.gen_batch)
    print("| SmolLM2-135M on CPU | planned GB | measured GB | planned / measured |\n|---|---|---|---|")
    cases = [
        ("update: full fine-tuning fp32, beta 0.001 (reference copy)", lambda: measure_update(beta=0.001)),
        ("update: full fine-tuning bf16, micro-batch 4", lambda: measure_update("bf16", micro_batch=4)),
        ("update: LoRA r 8, bf16", lambda: measure_update("bf16", 8, 0.001)),
        (
            "update: LoRA r 8, fp32, gradient checkpointing, 448 tokens",
            lambda: measure_update("fp32", 8, 0.001, True, prompt_len=384),
        ),
        ("sampling: 8 prompts x 256 + 32 tokens", measure_sampling),
        (
            "sampling through LoRA r 8 adapters, bf16: 8 prompts x 384 + 4 tokens",
            lambda: measure_sampling(8, 384, 4, dtype="bf16", lora_rank=8),
        ),
    ]
    for label, run in cases:
        measured, planned = run()[:2]
        print(f"| {label} | {planned / 1e9:.3f} | {measured / 1e9:.3f} | {planned / measured:.2f} |", flush=True)


if __name__ == "__main__":
    main()
