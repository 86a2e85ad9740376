"""The private score surface (an agent never sees it): minimum near LR 3e-3, depth 5, width 128."""

import math


def score(c: dict) -> float:
    lr, depth, width = c.get("LEARNING_RATE", 0.01), c.get("DEPTH", 2), c.get("WIDTH", 64)
    return 1.0 + (math.log10(lr) + 2.5) ** 2 + 0.05 * (depth - 5) ** 2 + 0.2 * abs(math.log2(width / 128))
