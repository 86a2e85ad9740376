"""Allocates host memory until the allocator refuses: oom (the test caps the child with --memory-limit)."""

import torch


def train(ctx):
    ctx.batch(4, 8)
    hoard = []
    while True:
        hoard.append(torch.ones(64 << 20, dtype=torch.uint8))  # 64 MiB at a time, touched
