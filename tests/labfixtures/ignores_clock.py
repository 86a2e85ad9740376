"""Keeps training on the batches it already has long after the budget: killed at the hard timeout."""

import time


def train(ctx):
    seen = list(ctx.batches(4, 8))
    while True:  # never looks at ctx.should_stop()
        time.sleep(0.05)
        len(seen)
