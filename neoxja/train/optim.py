"""AdamW with decoupled weight decay on matrices only, and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math
from functools import partial

import torch


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay for matrices (linear and embedding weights) only.

    LayerNorm weights and biases and every bias (e.g. the last layer's `dense_bias`) are vectors:
    decaying them towards zero only hurts, so they form the no-decay group.
    """
    decay, no_decay = [], []
    for param in model.parameters():  # tied weights appear once
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def fused_adamw_available(device: torch.device) -> bool:
    return device.type in ("cuda", "cpu", "xpu", "mps")


def make_optimizer(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    device: torch.device | None = None,
    fused: bool = True,
) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step where the device has it (unless fused=False)."""
    device = device or next(model.parameters()).device
    return torch.optim.AdamW(
        parameter_groups(model, weight_decay),
        lr=lr,
        betas=betas,
        eps=eps,
        fused=(fused and fused_adamw_available(device)) or None,
    )


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based).

    Linear warm-up over the first `warmup_steps` steps, the peak at step `warmup_steps`, then a half
    cosine down to min_ratio * peak at the last step (total_steps - 1).
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = total_steps - 1 - warmup_steps
    progress = min(1.0, (step - warmup_steps) / decay_steps) if decay_steps > 0 else 0.0
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, lr: float, min_lr: float, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    factor = partial(lr_factor, warmup_steps=warmup_steps, total_steps=total_steps, min_ratio=min_lr / lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
