"""A model whose logits are NaN: invalid."""

import torch
import torch.nn as nn


class NaNModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.context_len = 16
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, idx):
        return torch.full((*idx.shape, 256), float("nan"))


def train(ctx):
    for _ in ctx.batches(4, 8):
        pass
    return NaNModel()
