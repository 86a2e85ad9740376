"""Predicts every byte with probability 1/256: exactly 8 bits per byte."""

import torch
import torch.nn as nn


class Uniform(nn.Module):
    def __init__(self):
        super().__init__()
        self.context_len = 64
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, idx):
        return torch.zeros(*idx.shape, 256) + self.w


def train(ctx):
    for _ in ctx.batches(4, 8):
        pass
    return Uniform()
