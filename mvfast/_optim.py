"""How training optimises: the learning-rate schedule, parameter groups (weight decay, --lr-mult), the
parts --freeze and --lr-mult name, --class-weights auto and --sync-bn. train.py's steps call these."""

from __future__ import annotations

import math

import torch

from mvfast._cli import CLIError
from mvfast._config import TrainConfig


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "linear":
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * (1 - progress)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def part_of(name: str, parts) -> str | None:
    """The longest of `parts` (module names) that parameter `name` lies in, or None."""
    hits = [p for p in parts if name == p or name.startswith(p + ".")]
    return max(hits, key=len) if hits else None


def param_groups(model: torch.nn.Module, weight_decay: float, lr_mult: dict | None = None) -> list[dict]:
    """Weight decay on matrices and kernels only; one pair of groups per --lr-mult part (``lr_mult`` set),
    then the rest at the full learning rate."""
    lr_mult = lr_mult or {}
    groups: dict = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            part = part_of(name, lr_mult)
            groups.setdefault((part, p.dim() >= 2), []).append(p)
    out = []
    for part in [*lr_mult, None]:
        for decay in (True, False):
            if (part, decay) in groups or (part is None and not lr_mult):
                group = {
                    "params": groups.get((part, decay), []),
                    "weight_decay": weight_decay if decay else 0.0,
                }
                if part is not None:
                    group["lr_mult"] = lr_mult[part]
                out.append(group)
    return out


def check_parts(model: torch.nn.Module, names, flag: str) -> None:
    modules = dict(model.named_modules())
    bad = [n for n in names if n not in modules]
    if bad:
        top = ", ".join(n for n, _ in model.named_children())
        raise CLIError(
            f"{flag}: the model has no part {', '.join(bad)}; its parts are {top} (or dotted below)"
        )


def sync_batchnorm(model: torch.nn.Module) -> int:
    """Every BatchNorm of the model as a SyncBatchNorm; returns how many.

    A fused Conv+BN+ReLU block holds an nn.BatchNorm but computes its batch statistics inside the fused op,
    on this process's batch: converting the BatchNorm inside it would change nothing. So the blocks are
    unfused first (same parameters and buffers, same state_dict keys), and the BatchNorms converted then.
    """
    from mvfast.nn.fuse import unfuse

    unfuse(model)
    count = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert converted is model  # the model is not itself a BatchNorm
    return count


def auto_class_weights(items, num_classes: int, multi_label: bool) -> list[float]:
    """--class-weights auto from the training videos: single-label N / (C * n_c); multi-label BCE's
    pos_weight (N - n_c) / n_c. A class without videos gets 1."""
    counts = [0] * num_classes
    for item in items:
        for label in item.labels if multi_label and item.labels is not None else (item.label,):
            counts[label] += 1
    n = len(items)
    if multi_label:
        return [(n - c) / c if c else 1.0 for c in counts]
    return [n / (num_classes * c) if c else 1.0 for c in counts]
