"""Several devices: `torchrun --nproc_per_node N train_*.py ...` starts one process (rank) per device. Each
rank samples its share of the batch; PyTorch DDP averages the gradients (or FSDP2 shards the model), so the
update is the one a single process would make on the whole batch. Run alone, every helper here does nothing
special: (rank, world) = (0, 1)."""

import atexit
import os
from contextlib import contextmanager, nullcontext

import torch


def init_distributed():
    """(rank, world size): (0, 1) when run alone; under torchrun one process group, NCCL on GPUs, gloo on CPUs."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(dist.destroy_process_group)  # NCCL warns of leaked communicators otherwise
    return rank_world()


def collective_device(backend=None, local_rank=None):
    """Where a collective's tensors live: the rank's GPU under NCCL (it reduces no CPU tensor: the first update
    of a multi-GPU run would stop there), the CPU under gloo. Object collectives (`gather`) place their buffers
    on the current device themselves."""
    import torch.distributed as dist

    backend = backend or (dist.get_backend() if dist.is_initialized() else "gloo")
    if backend != "nccl":
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if local_rank is None else local_rank)


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

    if rank_world()[1] == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=collective_device())
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
        _DDP[id(model)] = DistributedDataParallel(
            model, device_ids=[model.device.index] if model.device.type == "cuda" else None
        )
    return _DDP[id(model)]


def micro_batches(model, n_items, size, reference=None):
    """This rank's n_items as index lists of `size` for gradient accumulation, each with the module its gradient pass
    goes through (the model; under torchrun its DDP wrapper): the caller's loop body runs for each inside the right
    gradient-sync context. Under DDP every rank runs as many micro-batches as the rank
    with the most: for each one it lacks it makes a zero pass (`zero_pass`: a forward and backward that adds
    nothing; with a sharded `reference`, that model's forward first, as the caller's loop runs it), so the syncs
    line up, and gradients are averaged over the ranks after the last micro-batch only."""
    net = ddp(model)
    chunks = [list(range(i, min(i + size, n_items))) for i in range(0, n_items, size)]
    total = max(gather([len(chunks)]))
    chunks += [[] for _ in range(total - len(chunks))]
    for k, idx in enumerate(chunks):
        with net.no_sync() if net is not model and k < total - 1 else nullcontext():
            if idx:
                yield idx, net
            else:
                zero_pass(net, reference)


def zero_pass(net, reference=None):
    """A forward and backward pass that adds nothing to the gradients, for the syncs of a rank with no data;
    with a sharded reference model, its pass first: collectives must come in the same order on every rank."""
    ids = torch.zeros((1, 2), dtype=torch.long, device=next(net.parameters()).device)
    if reference is not None and is_sharded(reference):
        with torch.no_grad():
            reference(input_ids=ids, use_cache=False)
    (net(input_ids=ids, use_cache=False).logits.float().sum() * 0).backward()


def rank_mean(*values):
    """Each value summed over the ranks, divided by their number (alone: the values themselves). The divisor of a
    loss: DDP averages the ranks' gradients, so each rank's loss divided by the rank-mean of the batch's token
    (or sequence) count makes that average the gradient of the whole batch's mean loss; and the statistics each
    rank computed with it, back to the whole batch's."""
    return [v / rank_world()[1] for v in all_sum(list(values))]


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
