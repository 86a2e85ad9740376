"""The synthetic byte source: a process whose exact next-byte distribution is a function of the bytes so far.

PRIVATE lab file: the agent never sees it, so it learns the data from training batches and cannot hand
in the generator as its model.

Every random choice the process makes is written into the stream, so `Process` can be replayed over
any byte string and says, at each position, the true probability of the next byte. That is what makes
the oracle floor exact: oracle_bpb = mean of -log2 p(x[i] | x[:i]) over the scored positions.

Structure at several ranges:
- local: a sparse variable-order Markov chain over letters and space (orders 1 to 4, a context is
  refined to a longer one only where the seed says so; each context allows a few next letters);
- nested brackets `( [ {`: the innermost open bracket selects one of four dialects (its own Markov
  tables), and a closing bracket always matches it, however far back it was opened;
- marked copy spans: `<text>` records a span, a later `=` repeats it verbatim, often a hundred or
  more bytes later, which rewards looking back.

`VERSION` keys the data cache: change it whenever the process changes.
"""

from __future__ import annotations

import math
import random

VERSION = 1
LETTERS = "abcdefghijklmnopqrstuvwxyz"
SYMBOLS = LETTERS + " "
OPEN, CLOSE = "([{", ")]}"
MAX_ORDER = 4
MAX_DEPTH = 4
P_OPEN = 0.05        # at a word boundary, open a bracket (split evenly across the three kinds)
P_CLOSE = 0.10       # at a word boundary inside brackets, close the innermost one
P_SPAN = 0.03        # at a word boundary with no span pending, start recording a span `<`
P_COPY = 0.03        # at a word boundary with a span pending, repeat it with `=`
P_SPAN_END = 0.15    # inside a span of 3 or more bytes, end it with `>`


class Language:
    """The fixed tables a seed chooses: which contexts are refined and each context's next-letter weights."""

    def __init__(self, seed: int):
        self.seed = seed
        self._split: dict[tuple[int, str], bool] = {}
        self._dist: dict[tuple[int, str, bool], list[tuple[int, float]]] = {}

    def _rng(self, *key) -> random.Random:
        return random.Random(f"{self.seed}:" + ":".join(map(str, key)))  # str seeds hash with sha512: stable

    def splits(self, dialect: int, ctx: str) -> bool:
        key = (dialect, ctx)
        if key not in self._split:
            self._split[key] = len(ctx) < MAX_ORDER and self._rng("split", dialect, ctx).random() < 0.5
        return self._split[key]

    def context(self, dialect: int, history: str) -> str:
        """The longest context of the variable-order chain that matches the end of history."""
        ctx = history[-1:]
        while len(ctx) < len(history) and self.splits(dialect, ctx):
            ctx = history[-len(ctx) - 1:]
        return ctx

    def dist(self, dialect: int, ctx: str, letters_only: bool) -> list[tuple[int, float]]:
        """Sparse next-symbol distribution [(byte, p)] of a context; letters_only drops the space."""
        key = (dialect, ctx, letters_only)
        if key not in self._dist:
            rng = self._rng("dist", dialect, ctx)
            chosen = rng.sample(LETTERS, rng.randint(2, 5)) + [" "]
            weights = [rng.expovariate(1.0) ** 2 + 0.02 for _ in chosen]
            weights[-1] = 0.25 + rng.random() * 0.6  # words end at a steady rate
            pairs = [(ord(c), w) for c, w in zip(chosen, weights, strict=True) if not (letters_only and c == " ")]
            total = sum(w for _, w in pairs)
            self._dist[key] = [(b, w / total) for b, w in pairs]
        return self._dist[key]


class Process:
    """The process's state after the bytes pushed so far; `dist()` is the exact next-byte distribution."""

    def __init__(self, language: Language):
        self.lang = language
        self.history = ""         # the last MAX_ORDER bytes
        self.stack: list[int] = []  # open bracket kinds, innermost last
        self.span: str | None = None  # while recording: the span so far
        self.pending = ""         # the last recorded span, not yet repeated
        self.copy: str | None = None  # while repeating: what is left to repeat

    def dist(self) -> list[tuple[int, float]]:
        if self.copy:
            return [(ord(self.copy[0]), 1.0)]
        dialect = self.stack[-1] + 1 if self.stack else 0
        last = self.history[-1:]
        letters_only = last not in LETTERS or last == ""
        base = self.lang.dist(dialect, self.lang.context(dialect, self.history), letters_only)
        if self.span is not None:
            if len(self.span) < 3:
                return base
            return [(b, p * (1 - P_SPAN_END)) for b, p in base] + [(ord(">"), P_SPAN_END)]
        if not letters_only:  # inside a word: only the chain speaks
            return base
        events: list[tuple[int, float]] = []
        if len(self.stack) < MAX_DEPTH:
            events += [(ord(c), P_OPEN / 3) for c in OPEN]
        if self.stack:
            events.append((ord(CLOSE[self.stack[-1]]), P_CLOSE))
        events.append((ord("=" if self.pending else "<"), P_COPY if self.pending else P_SPAN))
        rest = 1.0 - sum(p for _, p in events)
        return [(b, p * rest) for b, p in base] + events

    def push(self, byte: int) -> None:
        """Advance by one byte. Bytes the process could not have emitted are accepted too, so a predictor
        can be replayed over any input; the state then stays well defined, only no longer meaningful."""
        c = chr(byte)
        self.history = (self.history + c)[-MAX_ORDER:]
        if self.copy:
            self.copy = self.copy[1:] or None
        elif self.span is not None:
            if c == ">":
                self.pending, self.span = self.span, None
            else:
                self.span += c
        elif c in OPEN and len(self.stack) < MAX_DEPTH:
            self.stack.append(OPEN.index(c))
        elif c in CLOSE and self.stack:
            self.stack.pop()
        elif c == "<" and not self.pending:
            self.span = ""
        elif c == "=" and self.pending:
            self.copy, self.pending = self.pending, ""

    def prob(self, byte: int) -> float:
        for b, p in self.dist():
            if b == byte:
                return p
        return 0.0


def generate(seed: int, stream: str, n: int) -> bytes:
    """n bytes of the process for the language of `seed`; `stream` names an independent sample of it."""
    proc = Process(Language(seed))
    rng = random.Random(f"{seed}:sample:{stream}")
    out = bytearray()
    for _ in range(n):
        u, acc = rng.random(), 0.0
        dist = proc.dist()
        byte = dist[-1][0]
        for b, p in dist:
            acc += p
            if u < acc:
                byte = b
                break
        out.append(byte)
        proc.push(byte)
    return bytes(out)


def surprisal_bits(seed: int, data: bytes) -> list[float]:
    """-log2 p(data[i] | data[:i]) for i >= 1 (the first byte is never predicted)."""
    proc = Process(Language(seed))
    proc.push(data[0])
    bits = []
    for b in data[1:]:
        p = proc.prob(b)
        bits.append(-math.log2(p) if p > 0 else math.inf)
        proc.push(b)
    return bits


def oracle_bpb(seed: int, data: bytes) -> float:
    """The floor: mean surprisal over every predicted position of `data`, a stream started from scratch."""
    bits = surprisal_bits(seed, data)
    return sum(bits) / len(bits)
