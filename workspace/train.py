"""A small GPT over bytes, trained on the batches ctx hands out until ctx's budget is spent.

This is the file the agent edits. The judge (frozen/) calls train(ctx) in a child process, saves the
model it returns, and scores it on data this file never sees. See frozen/README.md for the contract:
train(ctx) returns an nn.Module with an int attribute `context_len`, whose forward(idx) maps int64
bytes (B, T), T <= context_len, to logits (B, T, 256) and never looks at later positions.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# --- hyperparameters ---
# The marked regions below are what the search space presets of rloop.toml narrow this file to:
# `hparams` is every constant, `optimizer` the optimizer and schedule (its constants and code).
# rloop: begin editable hparams optimizer
LEARNING_RATE = 2e-3     # peak learning rate (AdamW)
MIN_LR_FRAC = 0.1        # the learning rate decays to this fraction of the peak
WARMUP = 20              # warmup, in optimizer steps
WARMDOWN = 0.4           # fraction of the budget spent decaying the learning rate
WEIGHT_DECAY = 0.1       # AdamW weight decay (matrices only)
OPTIMIZER = "adamw"      # "adamw" or "sgd" (with Nesterov momentum)
BETA2 = 0.99             # AdamW second-moment decay
GRAD_CLIP = 1.0          # clip the gradient norm to this (0: no clipping)
# rloop: end editable
# rloop: begin editable hparams
DEPTH = 2                # transformer blocks
WIDTH = 128              # embedding width
N_HEAD = 4               # attention heads (WIDTH must divide by N_HEAD)
MLP_RATIO = 4            # hidden width of the MLP, as a multiple of WIDTH
CONTEXT = 128            # context length in bytes: the model's declared context_len
BATCH_SIZE = 32          # sequences per batch
DROPOUT = 0.0            # dropout rate (the data is plentiful; usually 0)
WARM_START = False       # start from the run's best model (ctx.load_checkpoint()) when the run offers one
# rloop: end editable
VOCAB = 256              # bytes


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH, bias=False)
        self.proj = nn.Linear(WIDTH, WIDTH, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # (B, T, C) each
        q, k, v = (z.view(B, T, N_HEAD, C // N_HEAD).transpose(1, 2) for z in (q, k, v))  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=DROPOUT if self.training else 0.0)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(WIDTH, MLP_RATIO * WIDTH, bias=False)
        self.down = nn.Linear(MLP_RATIO * WIDTH, WIDTH, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(WIDTH), Attention()
        self.ln2, self.mlp = nn.LayerNorm(WIDTH), MLP()
        self.drop = nn.Dropout(DROPOUT)

    def forward(self, x):
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.context_len = CONTEXT  # declared: the judge sends windows of at most this many bytes
        self.tok = nn.Embedding(VOCAB, WIDTH)
        self.pos = nn.Embedding(CONTEXT, WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(DEPTH))
        self.ln_f = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # scaled residual projections, as in GPT-2
            if name.endswith(("proj.weight", "down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * DEPTH))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx):
        B, T = idx.shape
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # (B, T, VOCAB)


# rloop: begin editable optimizer
def make_optimizer(model):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}]
    if OPTIMIZER == "sgd":
        return torch.optim.SGD(groups, lr=LEARNING_RATE, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=LEARNING_RATE, betas=(0.9, BETA2), fused=torch.cuda.is_available())


def lr_at(step, progress):
    """Linear warmup over WARMUP steps, flat, then a linear warmdown over the last WARMDOWN of the budget."""
    if step < WARMUP:
        return LEARNING_RATE * (step + 1) / WARMUP
    if progress < 1 - WARMDOWN:
        return LEARNING_RATE
    frac = (1 - progress) / WARMDOWN
    return LEARNING_RATE * (MIN_LR_FRAC + (1 - MIN_LR_FRAC) * frac)
# rloop: end editable optimizer


def train(ctx):
    cuda = ctx.device.startswith("cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    warm = ctx.load_checkpoint() if WARM_START else None  # None when the run offers no checkpoint
    model = warm if warm is not None else GPT().to(ctx.device)
    opt = make_optimizer(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params: {n_params:,}  device: {ctx.device}  budget: {ctx.budget}")
    step, loss = 0, None
    for x, y in ctx.batches(BATCH_SIZE, CONTEXT):  # (B, T) int64 each
        for group in opt.param_groups:
            group["lr"] = lr_at(step, ctx.progress())
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            logits = model(x)
            loss = F.cross_entropy(logits.float().view(-1, VOCAB), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if GRAD_CLIP:
            nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        if step % 50 == 0:
            print(f"step {step:5d}  loss {loss.item() / math.log(2):.3f} bits  progress {ctx.progress():.2f}")
        step += 1
    # The training loss is for people reading the log; the judge computes the metric itself.
    print(f"steps: {step}\ntrain_loss_bits: {loss.item() / math.log(2) if loss is not None else float('nan'):.4f}")
    return model
