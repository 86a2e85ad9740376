"""An MLP classifier for the mlp lab: train(ctx) builds it, trains it on ctx's batches and returns it.

The judge (frozen/experiment.py) serves the batches, stops them when the budget is spent, and scores the
returned model by the labels it predicts for inputs it has never seen (val_accuracy, higher is better).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

# Hyperparameters: change a number and run it.
# rloop: begin editable hparams
LEARNING_RATE = 0.003  # AdamW peak learning rate, decayed linearly to 0
HIDDEN = 64  # units per hidden layer
DEPTH = 2  # hidden layers
BATCH_SIZE = 64  # examples per step (one step is one batch)
WEIGHT_DECAY = 0.0  # AdamW weight decay
# rloop: end editable


class MLP(nn.Module):
    def __init__(self, n_in: int, n_out: int, hidden: int, depth: int):
        super().__init__()
        self.hidden = nn.ModuleList(nn.Linear(n_in if i == 0 else hidden, hidden) for i in range(depth))
        self.head = nn.Linear(hidden if depth else n_in, n_out)

    def forward(self, x):  # (B, F) -> (B, C) logits
        for layer in self.hidden:
            x = F.gelu(layer(x))
        return self.head(x)


class AdamW:
    """Adam with decoupled weight decay, written out: torch.optim's first use imports torch._dynamo (~1.3 s
    on a small CPU, as long as a whole experiment here)."""

    def __init__(self, params, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0):
        self.params = list(params)
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.betas, self.eps, self.weight_decay, self.t = betas, eps, weight_decay, 0

    @torch.no_grad()
    def step(self, lr: float):
        self.t += 1
        b1, b2 = self.betas
        for p, m, v in zip(self.params, self.m, self.v, strict=True):
            if p.grad is None:
                continue
            m.lerp_(p.grad, 1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            p.mul_(1 - lr * self.weight_decay)
            p.addcdiv_(m / (1 - b1**self.t), (v / (1 - b2**self.t)).sqrt_().add_(self.eps), value=-lr)
            p.grad = None


def train(ctx):
    model = MLP(ctx.n_features, ctx.n_classes, HIDDEN, DEPTH).to(ctx.device)
    opt = AdamW(model.parameters(), weight_decay=WEIGHT_DECAY)
    loss = None
    for x, y in ctx.batches(BATCH_SIZE):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step(LEARNING_RATE * (1.0 - ctx.progress()))  # linear decay to 0
    print(f"train_loss: {loss.item():.4f}" if loss is not None else "train_loss: -")
    print(f"steps: {ctx.step}")
    return model
