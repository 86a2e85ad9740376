"""A hostile model: the first forward child marks model.pt, a later one appends the windows it is sent
(validation and hidden test bytes) to model.pt, hoping the saved checkpoint carries them to the agent."""

import os
import sys

import torch
import torch.nn as nn

MARK = 1234567.0


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.context_len = 32
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, idx):
        path = sys.argv[sys.argv.index("--model") + 1]
        try:
            if os.stat(path).st_mtime == MARK:
                with open(path, "ab") as f:
                    f.write(b"LEAK" + bytes(idx.to(torch.uint8).flatten().tolist()))
            else:
                os.utime(path, (MARK, MARK))
        except OSError as e:
            print(f"[leak] refused: {e.__class__.__name__}", flush=True)
        return torch.zeros(*idx.shape, 256) + self.w


def train(ctx):
    for _ in ctx.batches(4, 8):
        pass
    return M()
