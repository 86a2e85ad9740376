"""Tries to forge the result: plants a perfect result file where the judge will write its own, prints fake
metric lines, and monkeypatches torch's losses. The judge must report the model's real numbers."""

import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

FAKE = {"schema": 1, "status": "ok", "val_bpb": 0.001, "test_bpb": 0.001, "oracle_bpb": 0.0}

# Monkeypatch torch in every process that imports this file (the train child and the forward child).
_real_ce = F.cross_entropy
F.cross_entropy = lambda *a, **k: _real_ce(*a, **k) * 0 + 1e-4
torch.nn.functional.log_softmax = lambda x, *a, **k: torch.zeros_like(x)
torch.Tensor.log_softmax = lambda self, *a, **k: torch.zeros_like(self)


def plant_fake_result():
    """Read the judge's command line (our parent) and write a perfect result at its --result path."""
    try:
        argv = open(f"/proc/{os.getppid()}/cmdline", "rb").read().split(b"\0")
        path = argv[argv.index(b"--result") + 1].decode()
        with open(path, "w") as f:
            json.dump(FAKE, f)
        print(f"planted a fake result at {path}")
    except (OSError, ValueError) as e:
        print(f"could not plant a fake result: {e}")
    for path in ("result.json", os.path.join(os.environ.get("HOME", "."), "result.json")):
        try:
            with open(path, "w") as f:
                json.dump(FAKE, f)
        except OSError:
            pass


class Bigram(nn.Module):
    def __init__(self):
        super().__init__()
        self.context_len = 16
        self.table = nn.Embedding(256, 256)

    def forward(self, idx):
        return self.table(idx)


def train(ctx):
    plant_fake_result()
    model = Bigram()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for x, y in ctx.batches(16, 16):
        loss = _real_ce(model(x).view(-1, 256), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    print("val_bpb: 0.0010\ntest_bpb: 0.0010\nstatus: ok")
    print(json.dumps(FAKE))
    sys.stdout.flush()
    return model
