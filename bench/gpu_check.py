"""The GPU check: on one CUDA device, the memory plan (memory.memory_plan) next to measured peaks and the
sampling speed of each decoding path, for the paper's models and the tiny one, built from their configs with
random weights (nothing is downloaded: it runs on a machine without network or model weights). One table;
not yet run in this form on a GPU (an estimate of its length, docs/scaling.md: ~13 minutes on one H200);
`--models` runs a part, so that a job with a 10-minute limit runs it in two.

    python bench/gpu_check.py                        # on a GPU; --models smollm2-135m for a quick look
    python bench/gpu_check.py --device cpu --tiny    # the same code on CPU, tiny configs (tests/test_bench.py)

Per model, in bf16 (fp32 on CPU): one sampling phase through lm.sample (64 distinct prompts x 1,408 tokens + 256 new
ones; random weights write to the limit, which is the case a plan must cover), the same with 8 prompts x G = 8 (the
shared prefill), each on the eager path (the default: a KV cache allocated once), with transformers' DynamicCache
(rewritten at every step) and on the compiled path (RWML_COMPILE_DECODING=on), side by side, and the shared
prefill's with LoRA r 64 adapters folded in, as RWML and Policy RL sample (lora.adapters_merged: its decoding step
should take the adapter-free row's time); for Qwen3-30B-A3B the eager path with its experts grouped (lm.sample) and with
transformers' own switch to "batched_mm" while decoding (lm.grouped_experts undone); and one GRPO update
(grpo.grpo_update, beta 0.001) with LoRA r 64 and gradient checkpointing on micro-batches of 2 x 1,664 tokens (the
second update: AdamW's moments exist; the mixture-of-experts model's adapters per expert, lora.LoRAExperts);
SmolLM2-shaped also with full fine-tuning (a frozen reference copy). Measured:
torch.cuda.max_memory_allocated (CPU: the bytes of tensors alive at once, bench/memory_plan.py's PeakMemory).
Prompts are random token ids written as words of a word-level tokenizer over the model's vocabulary (so a prompt is
exactly its length).
"""

import argparse
import contextlib
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory_plan import PAPER_MODELS, Peak, measure_sample_call, measure_update  # noqa: E402

import support.lm as lm  # noqa: E402
from support.lm import sample  # noqa: E402
from support.lora import add_lora  # noqa: E402
from support.memory import RATES, active_params, decode_bytes, device_kind  # noqa: E402
from support.runs import set_seed  # noqa: E402

# SmolLM2-135M-Instruct's config.json (the fields the model is built from; tests/test_bench.py compares
# them with the converted HF folder)
SMOLLM2 = (
    "llama",
    dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_parameters=dict(rope_theta=100000.0, rope_type="default"),
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
)
MODELS = {"smollm2-135m": SMOLLM2, **PAPER_MODELS}
# --tiny: each model's architecture at toy width, for the CPU run of this script
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
TINY_MOE = dict(moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2)


def build(name, device, dtype, tiny):
    """A model of `name`'s architecture with random weights, on `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kind, fields = MODELS[name]
    if tiny:
        fields = dict(fields, **TINY, **(TINY_MOE if "num_experts" in fields else {}), head_dim=16, vocab_size=512)
    config = AutoConfig.for_model(kind, **fields)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = None  # random weights: every row writes to the limit
    model.generation_config.pad_token_id = 0
    return model.eval()


def word_tokenizer(vocab_size):
    """A tokenizer whose token i is the word "t{i}": a prompt of n random words is exactly n tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="t0", unk_token="t0")
    tok.padding_side = "left"
    return tok


def check_sampling(model, tok, n_prompts, group, prompt_len, new_tokens, seed, path="eager", lora_rank=0):
    """(measured, planned, sampled tokens/s, seconds a decoding step, seconds of the prefill) of one lm.sample call:
    n_prompts random prompts x group rows (`lora_rank`: the model carries adapters of that rank). The step time is
    the call's time less that of the same call writing one token (its prefill; the least of 3 such calls: a busy
    machine only makes a call slower), over the other new_tokens - 1 steps. Timed after one untimed call (the eager
    path's first call pays one-time costs: with --tiny on CPU the first row read 112 sampled tokens/s timed on it,
    1,037 after it; the compiled path's compiles it and captures its CUDA graphs)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [
        " ".join(f"t{i}" for i in torch.randint(1, tok.vocab_size, (prompt_len,), generator=g).tolist())
        for _ in range(n_prompts)
    ]
    how = dict(compiled=path == "compiled", static=path != "dynamic")  # lm.sample's decoding path
    sample(model, tok, prompts, new_tokens if how["compiled"] else 2, temperature=1.0, n=group, **how)
    measured, planned, rate = measure_sample_call(model, tok, prompts, new_tokens, group, lora_rank=lora_rank, **how)
    prefill = []
    for _ in range(3):
        with Peak(model.device) as p:
            sample(model, tok, prompts, 1, temperature=1.0, n=group, **how)  # the prefill alone
        prefill.append(p.seconds)
    step = (n_prompts * group * new_tokens / rate - min(prefill)) / (new_tokens - 1)
    return measured, planned, rate, step, min(prefill)


def reserved(device):
    """GB the CUDA caching allocator held at most (allocated tensors + its free blocks: what the card must hold),
    beside max_memory_allocated, which the plan is checked against; "–" on a CPU."""
    return f"{torch.cuda.max_memory_reserved(device) / 1e9:.3g}" if device.type == "cuda" else "–"


def decode_limit(config, dtype, rows, context, bandwidth, path="eager", new_tokens=0):
    """The least seconds a decoding step can take on a card of `bandwidth` bytes/s: it must move what the path
    moves (memory.decode_bytes: the weights, the KV cache of `rows` rows of `context` tokens, the dynamic cache's
    copy, the compiled path's repeated K/V, batched_mm's copied experts) once."""
    return decode_bytes(config, dtype, rows, context, path, new_tokens) / bandwidth


def limit_cells(model, rows, prompt_len, new_tokens, step, bandwidth, path="eager"):
    """The table's decode cells: achieved step ms | bandwidth-limit ms | limit / achieved, for the mean step."""
    if not bandwidth:
        return f"{1e3 * step:.2f} | – | –"
    limit = decode_limit(model.config, model.dtype, rows, prompt_len + new_tokens, bandwidth, path, new_tokens)
    return f"{1e3 * step:.2f} | {1e3 * limit:.2f} | {limit / step:.2f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="toy widths and lengths (the CPU test of this script)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument(
        "--decoding",
        nargs="+",
        choices=["eager", "dynamic", "compiled"],
        default=None,
        help="lm.sample's paths to time for dense models: eager (its static cache), dynamic (transformers' "
        "DynamicCache), compiled (default: all three on CUDA, eager and dynamic on CPU, where inductor compiles for "
        "minutes); a mixture-of-experts model: its experts grouped and transformers' batched_mm",
    )
    p.add_argument(
        "--bandwidth-gbs",
        type=float,
        default=None,
        help="the card's memory bandwidth, GB/s, for the decode step's limit (default: support/memory.py RATES of "
        "the card; none on CPU)",
    )
    a = p.parse_args()
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device here (run with --device cpu --tiny to check the script on CPU)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    decoding = a.decoding or (["eager", "dynamic", "compiled"] if device.type == "cuda" else ["eager", "dynamic"])
    bandwidth = a.bandwidth_gbs * 1e9 if a.bandwidth_gbs else RATES[device_kind()]["bandwidth"]
    plan_rate = RATES[device_kind()]["prefill"]  # bf16 on a card; the CPU's row is fp32's
    # the paper's policy turn: 1,408 prompt tokens + 256 written; --tiny: the same shape, small
    n_prompts, group, prompt_len, new_tokens, micro_batch = (8, 2, 48, 16, 2) if a.tiny else (64, 8, 1408, 256, 2)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"{gpu}, torch {torch.__version__}, transformers {__import__('transformers').__version__}; "
        f"{str(dtype).split('.')[-1]}, random weights{' (tiny widths)' if a.tiny else ''}; "
        f"sampling {n_prompts} prompts x {prompt_len} + {new_tokens} tokens; "
        f"updates: 2 micro-batches of {micro_batch} x {prompt_len + new_tokens} tokens, beta 0.001; "
        f"bandwidth {f'{bandwidth / 1e9:.0f} GB/s' if bandwidth else 'unknown'}"
    )
    print(
        "| model | phase | planned GB | measured GB | measured / planned | speed | decode step ms | bandwidth limit ms "
        "| limit / step | reserved GB | prefill rate / the time plan's |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    for name in a.models:
        moe = "num_experts" in MODELS[name][1]
        # sampling: one model per path, both rows on it (the compiled path compiles once per model)
        for path in ["eager", "batched_mm"] if moe else decoding:
            set_seed(a.seed)
            model = build(name, device, dtype, a.tiny)
            tok = word_tokenizer(model.config.vocab_size)
            shared = f"sampling {n_prompts // group} prompts x G {group} (shared prefill)"
            for label, kw in (
                (f"sampling {n_prompts} distinct prompts", dict(n_prompts=n_prompts, group=1)),
                (shared, dict(n_prompts=n_prompts // group, group=group)),
                # as RWML and Policy RL sample: LoRA adapters folded in (lora.adapters_merged), beside the row above
                *([(f"{shared}, LoRA r 64 merged", dict(n_prompts=n_prompts // group, group=group, lora_rank=64))]
                  if path == "eager" and not moe else []),
            ):  # fmt: skip
                if kw.get("lora_rank"):
                    add_lora(model, kw["lora_rank"])
                with transformers_experts(path == "batched_mm"):
                    measured, planned, rate, step, prefill = check_sampling(
                        model,
                        tok,
                        prompt_len=prompt_len,
                        new_tokens=new_tokens,
                        seed=a.seed,
                        path="eager" if path == "batched_mm" else path,
                        **kw,
                    )
                if path == "batched_mm" and device.type != "cpu":  # one layer's copied experts (none on CPU)
                    c = model.config
                    planned += n_prompts * c.num_experts_per_tok * 3 * c.moe_intermediate_size * c.hidden_size * 2
                gb = f"{planned / 1e9:.3g} | {measured / 1e9:.3g} | {measured / planned:.2f}"
                cells = limit_cells(model, n_prompts, prompt_len, new_tokens, step, bandwidth, path)
                # the prefill's rate as the time plan counts it (memory.time_plan: tokens x active parameters / s)
                ratio = kw["n_prompts"] * prompt_len * active_params(model.config) / prefill / plan_rate
                cells += f" | {reserved(device)} | {ratio:.2f}"
                print(f"| {name} | {label}, {path} | {gb} | {rate:.0f} sampled tokens/s | {cells} |", flush=True)
            del model, tok
            release(device)
        cases = [("GRPO update, LoRA r 64, gradient checkpointing", 64)] + (
            [("GRPO update, full fine-tuning (reference copy)", 0)] if name == "smollm2-135m" else []
        )
        for label, rank in cases:  # LoRA with gradient checkpointing, or full fine-tuning with its reference copy
            set_seed(a.seed)
            model = build(name, device, dtype, a.tiny)
            measured, planned, seconds = measure_update(
                lora_rank=rank,
                beta=0.001,
                grad_checkpointing=bool(rank),
                micro_batch=micro_batch,
                prompt_len=prompt_len,
                completion_len=new_tokens,
                seed=a.seed,
                model=model,
            )
            gb = f"{planned / 1e9:.3g} | {measured / 1e9:.3g} | {measured / planned:.2f}"
            print(f"| {name} | {label} | {gb} | {seconds:.1f} s | – | – | – | {reserved(device)} | – |", flush=True)
            del model
            release(device)


@contextlib.contextmanager
def transformers_experts(on):
    """`with transformers_experts(True):` samples as transformers would decode a mixture-of-experts model on its
    own: lm.grouped_experts undone, so that `generate` switches the experts to "batched_mm" off the CPU."""
    keep = lm.grouped_experts
    if on:
        lm.grouped_experts = lambda model: contextlib.nullcontext()
    try:
        yield
    finally:
        lm.grouped_experts = keep


def release(device):
    """Free what the last model left (its reference cycles, compiled graphs and their CUDA graph memory pools)
    before the next one is built and measured."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
