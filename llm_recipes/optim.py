"""Optimizer and learning-rate schedule.

The schedule advances once per optimizer step (the ULD fork stepped OneCycle per micro-batch while
sizing it in micro-batches, which bends the schedule under gradient accumulation).
"""
from __future__ import annotations

import math

import torch


def build_optimizer(model: torch.nn.Module, train_config) -> torch.optim.Optimizer:
    """AdamW, SGD or Adafactor over the trainable parameters; no weight decay on biases and norms."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": train_config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    name = train_config.optimizer.lower()
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=train_config.lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=train_config.lr, momentum=train_config.momentum)
    if name == "adafactor":
        return torch.optim.Adafactor(groups, lr=train_config.lr)
    raise AssertionError(name)  # config.validate has refused other names


def warmup_steps(train_config, total_steps: int) -> int:
    if train_config.warmup_steps > 0:
        return min(train_config.warmup_steps, total_steps)
    return int(train_config.warmup_ratio * total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, train_config, total_steps: int):
    """OneCycle (llama-recipes' default), or cosine / linear / constant after a linear warm-up."""
    name = train_config.scheduler.lower()
    if name == "onecycle" and total_steps >= 2:
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=train_config.lr, total_steps=total_steps, pct_start=train_config.pct_start,
            div_factor=train_config.div_factor, final_div_factor=train_config.final_div_factor)
    warmup = warmup_steps(train_config, total_steps) if name != "onecycle" else 0
    decay = {"cosine": lambda t: 0.5 * (1.0 + math.cos(math.pi * t)), "linear": lambda t: 1.0 - t}.get(
        name, lambda t: 1.0)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return decay(min(1.0, progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
