"""train(ctx) raises after one batch: crashed."""


def train(ctx):
    ctx.batch(4, 8)
    raise RuntimeError("boom: a bug in train.py")
