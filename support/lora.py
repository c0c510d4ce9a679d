"""LoRA by hand (Hu et al., 2021): y = W x + (alpha / r) B A x, B = 0 at the start. The adapters train in fp32
beside frozen base weights; `adapters_off` gives the reference policy without a second copy of the model;
`adapters_merged` folds them into the weights while the stages sample; `merged_state_dict` folds them in for a
checkpoint any stage loads as a plain HF folder. A mixture-of-experts model's fused experts get one pair of
factors per expert (`LoRAExperts`)."""

import contextlib

import torch

from support.checks import fail
from support.lm import LORA_TARGETS


class LoRALinear(torch.nn.Module):
    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base, self.scale, self.enabled = base, alpha / rank, True
        self.A = torch.nn.Parameter(
            torch.randn(rank, base.in_features, device=base.weight.device) / base.in_features**0.5
        )
        self.B = torch.nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))  # fp32 adapters
        self.loaded = {"weight": host_copy(base.weight)}

    def weights(self):  # {name: the frozen weight}, each with its factors below, as LoRAExperts'
        return {"weight": self.base.weight}

    def factors(self):
        return {"weight": self}

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        return y + ((x.to(self.A.dtype) @ self.A.T) @ (self.scale * self.B).T).to(y.dtype)  # fp32 adapters


class ExpertFactors(torch.nn.Module):
    """The LoRA factors of every expert of one fused weight [experts, out, in]: A [experts, r, in], B [experts, out,
    r] (B = 0), fp32, one parameter each (every update uses it, so DDP finds no unused parameter)."""

    def __init__(self, weight, rank):
        super().__init__()
        E, out, inp = weight.shape
        self.A = torch.nn.Parameter(torch.randn(E, rank, inp, device=weight.device) / inp**0.5)
        self.B = torch.nn.Parameter(torch.zeros(E, out, rank, device=weight.device))

    def delta(self, x, e, scale):
        """scale B_e A_e x, in fp32."""
        return (x.to(self.A.dtype) @ self.A[e].T) @ (scale * self.B[e]).T


class LoRAExperts(torch.nn.Module):
    """LoRA of a mixture-of-experts layer's fused experts (transformers 5, Qwen3-MoE's `Qwen3MoeExperts`: `gate_up_proj`
    [experts, 2 I, hidden], `down_proj` [experts, hidden, I]): expert e computes with W_e + scale B_e A_e, each
    expert its own factors. With the adapters on, the experts run transformers' eager loop (models/qwen3_moe/
    modeling_qwen3_moe.py, `Qwen3MoeExperts.forward`) with each expert's B A x added; off or merged, the base
    module's own (grouped) kernels."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base, self.scale, self.enabled = base, alpha / rank, True
        self.gate_up, self.down = ExpertFactors(base.gate_up_proj, rank), ExpertFactors(base.down_proj, rank)
        self.loaded = {n: host_copy(w) for n, w in self.weights().items()}

    def weights(self):
        return {"gate_up_proj": self.base.gate_up_proj, "down_proj": self.base.down_proj}

    def factors(self):
        return {"gate_up_proj": self.gate_up, "down_proj": self.down}

    def forward(self, hidden_states, top_k_index, top_k_weights):
        if not self.enabled:
            return self.base(hidden_states, top_k_index, top_k_weights)
        W_gu, W_d, out = self.base.gate_up_proj, self.base.down_proj, torch.zeros_like(hidden_states)
        for e in top_k_index.unique().tolist():  # the experts this batch's tokens are routed to
            token, slot = torch.where(top_k_index == e)
            x = hidden_states[token]
            gate, up = (x @ W_gu[e].T + self.gate_up.delta(x, e, self.scale).to(x.dtype)).chunk(2, dim=-1)
            h = self.base.act_fn(gate) * up
            y = (h @ W_d[e].T + self.down.delta(h, e, self.scale).to(h.dtype)) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def host_copy(w):
    """The frozen weight as loaded, on the host (pinned: one fast copy back), never saved: what `adapters_merged`
    restores after a rollout (W + d - d is not W in floating point)."""
    w = w.detach()
    return torch.empty(w.shape, dtype=w.dtype, pin_memory=w.is_cuda).copy_(w)


def check_experts(module, name):
    """One line and stop for fused experts laid out otherwise than Qwen3-MoE's (transformers' `use_experts_
    implementation` flags: gate and up concatenated, [experts, out, in], no bias, no norm after an expert)."""
    layout = dict(has_gate=True, has_bias=False, is_transposed=False, is_concatenated=True, has_post_expert_norm=False)
    if any(getattr(module, k, v) != v for k, v in layout.items()) or not hasattr(module, "act_fn"):
        fail(f"--lora-rank on {name}: its fused experts are not laid out as Qwen3-MoE's ({layout}); no LoRA of them")


def add_lora(model, rank, alpha=None):
    """Freeze the model and wrap its attention/MLP projections with adapters, and a mixture-of-experts model's
    fused experts with per-expert ones (`LoRAExperts`); returns the trainable params."""
    model.requires_grad_(False)
    for path, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            if name in LORA_TARGETS and isinstance(child, torch.nn.Linear):
                setattr(module, name, LoRALinear(child, rank, alpha or 2 * rank))
            elif name == "experts" and getattr(child, "gate_up_proj", None) is not None:
                check_experts(child, f"{path}.{name}")
                setattr(module, name, LoRAExperts(child, rank, alpha or 2 * rank))
    return [p for p in model.parameters() if p.requires_grad]


ADAPTED = (LoRALinear, LoRAExperts)


class adapters_off:
    """`with adapters_off(model):` runs the base weights: the reference policy without a second copy."""

    def __init__(self, model):
        self.layers = [m for m in model.modules() if isinstance(m, ADAPTED)]

    def __enter__(self):
        for m in self.layers:
            m.enabled = False

    def __exit__(self, *exc):
        for m in self.layers:
            m.enabled = True


@contextlib.contextmanager
def adapters_merged(model):
    """`with adapters_merged(model):` around a rollout: every adapted weight becomes W + scale B A in place, in the
    weights' own dtype, and the adapters step aside, so a decoding step runs the plain model's ops (through the
    adapters each projection adds its own matmuls, casts and views, and a GPU's decoding step is bound by its
    kernel launches). On exit the loaded weights are copied back from the host (`loaded`, `host_copy`), bit for bit,
    also after an error.

    In fp32 the merged weights compute what the update computes up to fp32 rounding. In bf16 they are rounded
    once: an update below half a bf16 step of W is lost in them (early in training, most of it), yet the sampled
    distribution stays as close to the update's as sampling through the adapters gets, because both sit on the
    same bf16 noise of the forward itself (bench/lora_sampling.py measures it). pi_old is the update's own forward
    (grpo.grpo_update), so the ratio never mixes the two computations."""
    layers = [m for m in model.modules() if isinstance(m, ADAPTED)]
    try:
        with torch.no_grad():
            for m in layers:
                m.enabled = False
                for name, w in m.weights().items():
                    fold(w, m.factors()[name], m.scale)
        yield model
    finally:
        with torch.no_grad():
            for m in layers:
                for name, w in m.weights().items():
                    w.copy_(m.loaded[name])
                m.enabled = True


def fold(w, f, scale):
    """W += scale B A in place, in W's dtype, a matrix (an expert's) at a time: one fp32 copy of it (none in fp32)."""
    for w_e, B_e, A_e in zip(*(t if t.dim() == 3 else t[None] for t in (w, f.B, f.A))):
        w_e.copy_(w_e.float().addmm_(B_e, A_e, alpha=scale))


@torch.no_grad()
def merged_state_dict(model):
    """The model's weights with adapters folded in (W + scale B A), under the plain HF names, and the share of the
    merged weights that a bf16 copy would leave where they started (their update below bf16's resolution).

    Each merge runs in fp32 on the CPU, one tensor at a time (no second copy of the model on the device), and
    the merged weights are saved in fp32 whatever the base's dtype: the adapters train in fp32, and with bf16
    base weights an update smaller than half a bf16 step of W (|scale B A| < 0.2-0.4% of |W|, most of them at
    lr 1e-5) would be rounded away, so that the next stage starts from another model than the one trained.
    Loaded in fp32 (`--dtype fp32`, the forgetting measure), the checkpoint computes what the trained model
    computed; loaded in bf16 (`--dtype auto` on CUDA) its merged weights are rounded once more, to within the
    bf16 noise the trained model computed with, and the returned share says how many updates that loses.
    The price: merged projections take 4 bytes a weight on disk and in host memory while saving (7B: ~26 GB)."""
    sd = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if not k.endswith((".A", ".B"))}
    lost = merged = 0
    for name, m in model.named_modules():
        if not isinstance(m, ADAPTED):
            continue
        for key, w in m.weights().items():
            f, base = m.factors()[key], w.float().cpu()
            delta = m.scale * (f.B.float().cpu() @ f.A.float().cpu())  # [out, in], or [experts, out, in]
            sd[f"{name}.{key}"] = base + delta
            merged += base.numel()
            if w.dtype == torch.bfloat16:
                lost += ((sd[f"{name}.{key}"].bfloat16().float() == base) & (delta != 0)).sum().item()
    return sd, lost / max(1, merged)


def has_adapters(model):
    return any(isinstance(m, ADAPTED) for m in model.modules())
