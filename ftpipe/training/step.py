"""One optimizer step: which examples it takes (a function of seed and step alone, so a
resumed run sees the same ones), its micro-batches moved to the device without waiting,
forward and backward weighted by labelled tokens, and NEFTune's embedding noise.
"""

from __future__ import annotations

from ftpipe.training.batches import IGNORE_INDEX
from ftpipe.training.loss import token_loss_sum


def step_examples(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Indices of the examples of optimizer step `step` (0-based): each epoch is a fresh
    permutation seeded by (seed, epoch); a function of the step alone, so resuming at
    step k needs no sampler state."""
    import torch

    per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(step, per_epoch)
    cache = step_examples.__dict__.setdefault("_cache", {})
    key = (n, seed, epoch)
    if key not in cache:
        cache.clear()
        cache[key] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    order = cache[key]
    return order[pos * batch_size: (pos + 1) * batch_size]


def neftune_hook(alpha: float):
    """NEFTune noise, uniform in +-alpha / sqrt(L * d) with L each example's own length.

    `module._ftpipe_lengths` holds, for every token, the length of the example it belongs
    to (set before each forward): padding never shrinks an example's noise, and in packed
    rows each example keeps its own scale instead of the row's.
    """
    import torch

    def hook(module, inputs, output):
        if not module.training:
            return output
        lengths = getattr(module, "_ftpipe_lengths", None)
        dims = output.shape[-1]
        if lengths is None:
            lengths = torch.full(output.shape[:2], output.shape[1], device=output.device)
        scale = alpha / torch.sqrt(lengths.to(output.dtype) * dims)
        noise = torch.zeros_like(output).uniform_(-1, 1)
        return output + noise * scale.unsqueeze(-1)

    return hook


def step_inputs(batches: list[dict], device, world: int = 1) -> tuple[list[dict], int, int]:
    """A step's micro-batches, built on the CPU, ready for the device: (batches, labelled
    tokens, real tokens), the counts summed over the `world` processes. The counts and each
    micro-batch's loss positions are read on the CPU, and the tensors travel from pinned
    memory without blocking, so on one process nothing here waits for the GPU to finish the
    previous step."""
    import torch

    from ftpipe.training.loss import loss_positions

    cuda = device.type == "cuda"
    n_label = n_real = 0
    out = []
    for b in batches:
        b = dict(b)
        n_real += int(b.pop("real"))
        pos = loss_positions(b["labels"], IGNORE_INDEX)
        n_label += pos.numel()
        b["loss_positions"] = pos
        out.append({k: (v.contiguous().pin_memory().to(device, non_blocking=True) if cuda else v.to(device))
                    if hasattr(v, "to") else v for k, v in b.items()})
    if world > 1:
        import torch.distributed as dist

        totals = torch.tensor([n_label, n_real], dtype=torch.int64, device=device)
        dist.all_reduce(totals)
        n_label, n_real = totals.tolist()
    return out, n_label, n_real


def forward_backward(model, batches: list[dict], scale: float, embed, autocast, adapter_cast,
                     loss_model: bool, device):
    """Forward and backward over a step's micro-batches (from step_inputs), each token loss
    weighted by `scale`; returns the step's summed token loss as a device tensor (float64),
    not read back, so the host can prepare the next step while the GPU works."""
    import torch

    step_loss = torch.zeros((), dtype=torch.float64, device=device)
    for b in batches:
        embed._ftpipe_lengths = b.pop("lengths", None)
        positions = b.pop("loss_positions")
        with autocast, adapter_cast:
            if loss_model:
                loss_sum = model(loss_positions=positions, **{k: v for k, v in b.items() if k != "attention_mask"
                                                             or "position_ids" not in b})
            else:
                loss_sum, _ = token_loss_sum(model, b)
        (loss_sum * scale).backward()
        step_loss += loss_sum.detach().double()
    return step_loss
