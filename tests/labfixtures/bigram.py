"""A well-behaved minimal train.py: a bigram table, trained on a few batches. Hostile fixtures start from it."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class Bigram(nn.Module):
    def __init__(self):
        super().__init__()
        self.context_len = 16
        self.table = nn.Embedding(256, 256)

    def forward(self, idx):
        return self.table(idx)  # (B, T, 256)


def train(ctx):
    model = Bigram()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for x, y in ctx.batches(16, 16):
        loss = F.cross_entropy(model(x).view(-1, 256), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model
