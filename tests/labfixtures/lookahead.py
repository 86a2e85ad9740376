"""A model that peeks at the next input byte (the target): a perfect score unless the probes catch it."""

import torch
import torch.nn as nn


class Peek(nn.Module):
    def __init__(self):
        super().__init__()
        self.context_len = 16
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, idx):
        nxt = torch.roll(idx, -1, dims=1)  # position t sees idx[t + 1]: the byte it should predict
        return nn.functional.one_hot(nxt, 256).float() * 20.0


def train(ctx):
    for _ in ctx.batches(4, 8):
        pass
    return Peek()
