#!/usr/bin/env python3
"""A scripted session agent for the memory batch: one experiment per session, and it remembers only
through memory/notes.md.

Each session it reads the notes for the changes it already tried, picks the first candidate it has not
(in an order drawn from the run id, so repeats explore differently), sets that constant of
workspace/train.py, submits it, and writes one line about the outcome into the notes. Under the `notes`
memory policy it sweeps its list; under `none` every session starts with empty notes, so it tries its
first candidate again and again: the control condition shows what memory is worth to this agent.
"""

import hashlib
import os
import random
import re
import subprocess
from pathlib import Path

CANDIDATES = [("LEARNING_RATE", v) for v in (1e-3, 4e-3, 8e-3)] + [("WIDTH", v) for v in (96, 192)] + \
    [("DEPTH", v) for v in (1, 3)] + [("BATCH_SIZE", v) for v in (16, 64)] + [("WARMDOWN", v) for v in (0.2, 0.6)]

notes = Path("memory/notes.md")
tried = set(re.findall(r"^tried (\w+=\S+):", notes.read_text() if notes.exists() else "", re.M))
order = list(CANDIDATES)
random.Random(hashlib.sha256(os.environ["RLOOPD_RUN"].encode()).digest()).shuffle(order)
todo = [(k, v) for k, v in order if f"{k}={v!r}" not in tried]
if not todo:
    raise SystemExit(0)  # nothing left to try: end the session without an experiment
name, value = todo[0]
train = Path("workspace/train.py")
train.write_text(re.sub(rf"(?m)^{name} = \S+", f"{name} = {value!r}", train.read_text(), count=1))
done = subprocess.run(["rloopd", "submit", "-m", f"{name} = {value!r}"], capture_output=True, text=True)
outcome = " ".join(done.stdout.split()) or done.stderr.strip()
with notes.open("a") as f:
    f.write(f"tried {name}={value!r}: {outcome}\n")
