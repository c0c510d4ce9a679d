"""LoRA by hand (Hu et al., 2021): y = W x + (alpha / r) B A x, B = 0 at the start. The adapters train in fp32
beside frozen base weights; `adapters_off` gives the reference policy without a second copy of the model;
`adapters_merged` folds them into the weights while the stages sample; `merged_state_dict` folds them in for a
checkpoint any stage loads as a plain HF folder."""

import contextlib

import torch

from support.lm import LORA_TARGETS
from support.memory import check_lora_targets


class LoRALinear(torch.nn.Module):
    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base, self.scale, self.enabled = base, alpha / rank, True
        self.A = torch.nn.Parameter(
            torch.randn(rank, base.in_features, device=base.weight.device) / base.in_features**0.5
        )
        self.B = torch.nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))  # fp32 adapters
        # the frozen weights as loaded, kept on the host (pinned: one fast copy back), never saved: what
        # `adapters_merged` restores after a rollout (W + d - d is not W in floating point)
        w = base.weight.detach()
        self.loaded = torch.empty(w.shape, dtype=w.dtype, pin_memory=w.is_cuda).copy_(w)

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        return y + ((x.to(self.A.dtype) @ self.A.T) @ (self.scale * self.B).T).to(y.dtype)  # fp32 adapters


def add_lora(model, rank, alpha=None):
    """Freeze the model and wrap its attention/MLP projections with adapters; returns the trainable params.
    A mixture-of-experts model stops here in one line: its fused experts are no nn.Linear (`check_lora_targets`)."""
    check_lora_targets(model.config, rank)
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


@contextlib.contextmanager
def adapters_merged(model):
    """`with adapters_merged(model):` around a rollout: every adapted weight becomes W + scale B A in place, in the
    weights' own dtype, and the adapters step aside, so a decoding step runs the plain model's ops (through the
    adapters each projection adds its own matmuls, casts and views, and a GPU's decoding step is bound by its
    kernel launches). On exit the loaded weights are copied back from the host (`LoRALinear.loaded`), bit for bit,
    also after an error.

    In fp32 the merged weights compute what the update computes up to fp32 rounding. In bf16 they are rounded
    once: an update below half a bf16 step of W is lost in them (early in training, most of it), yet the sampled
    distribution stays as close to the update's as sampling through the adapters gets, because both sit on the
    same bf16 noise of the forward itself (bench/lora_sampling.py measures it). pi_old is the update's own forward
    (grpo.grpo_update), so the ratio never mixes the two computations."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    try:
        with torch.no_grad():
            for m in layers:
                m.enabled = False
                w = m.base.weight
                w.copy_(w.float().addmm_(m.B, m.A, alpha=m.scale))  # one fp32 copy of W at a time (none in fp32)
        yield model
    finally:
        with torch.no_grad():
            for m in layers:
                m.base.weight.copy_(m.loaded)
                m.enabled = True


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
        if isinstance(m, LoRALinear):
            w = m.base.weight.float().cpu()
            delta = m.scale * (m.B.float().cpu() @ m.A.float().cpu())
            sd[f"{name}.weight"] = w + delta
            merged += w.numel()
            if m.base.weight.dtype == torch.bfloat16:
                lost += ((sd[f"{name}.weight"].bfloat16().float() == w) & (delta != 0)).sum().item()
    return sd, lost / max(1, merged)


def has_adapters(model):
    return any(isinstance(m, LoRALinear) for m in model.modules())
