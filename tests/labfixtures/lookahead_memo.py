"""Looks ahead, and remembers every window it answered so that a probe (a window sharing a prefix with
one seen before) gets the very same answers on that prefix. One forward process would be fooled; the
judge sends a probe and its original to two different processes, so it is still caught."""

import torch
import torch.nn as nn

SEEN = []  # (input row, logits row) of every window answered in this process


class MemoPeek(nn.Module):
    def __init__(self):
        super().__init__()
        self.context_len = 16
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, idx):
        nxt = torch.roll(idx, -1, dims=1)
        out = nn.functional.one_hot(nxt, 256).float() * 20.0  # (B, T, 256): the answer, by looking ahead
        for b in range(idx.shape[0]):
            row = idx[b].tolist()
            for old_row, old_out in SEEN:
                m = 0
                while m < len(row) and m < len(old_row) and row[m] == old_row[m]:
                    m += 1
                if m:
                    out[b, :m] = old_out[:m]
            SEEN.append((row, out[b].clone()))
        return out


def train(ctx):
    for _ in ctx.batches(4, 8):
        pass
    return MemoPeek()
