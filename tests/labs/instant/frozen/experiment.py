"""Entry point of the instant lab: reads train.py's constants (never runs it) and writes a result at once.

Accepts the same arguments as the reference lab's entry point. `STATUS` in train.py chooses what the judge
reports, so loop tests can drive every status; "hang" sleeps past any deadline; "fake" prints a fake
metric line and plants a fake result file in the workspace, neither of which may count.
"""

import argparse
import ast
import json
import os
import sys
import time
from pathlib import Path

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).parent / "private"))
import surface  # noqa: E402

p = argparse.ArgumentParser()
for name in ("--workspace", "--result", "--budget", "--timeout", "--seed", "--secrets-fd", "--sandbox",
             "--cache", "--scratch", "--log", "--source", "--memory-limit", "--device", "--save-model",
             "--warm-start"):
    p.add_argument(name)
a = p.parse_args()
secrets = json.loads(os.read(int(a.secrets_fd), 4096)) if a.secrets_fd else {"test_secret": ""}
consts = {}
for node in ast.parse(Path(a.workspace, "train.py").read_text()).body:
    if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
        consts[node.targets[0].id] = ast.literal_eval(node.value)
status = consts.get("STATUS", "ok")
time.sleep(float(consts.get("SLEEP", 0.0)))
if status == "hang":
    time.sleep(3600)
if status == "crashed":
    sys.exit(3)  # no result file: the runner reports crashed
value = surface.score(consts)
if status == "fake":
    print("val_bpb: 0.0001")
    Path(a.workspace, "result.json").write_text(json.dumps({"status": "ok", "val_bpb": 0.0001}))
    status = "ok"
secret_shift = (sum(secrets.get("test_secret", "").encode()) % 97) / 1e4  # the hidden split differs
result = {"status": status, "val_bpb": round(value, 6) if status == "ok" else None,
          "test_bpb": round(value + 0.0123 + secret_shift, 6) if status == "ok" else None,
          "oracle_bpb": 1.0, "train_steps": int(str(a.budget).split(":")[-1]) if "steps" in str(a.budget) else None}
if a.warm_start:  # WARM_START = True in train.py "loads" the offered checkpoint: it must be one this lab saved
    result["warm_started"] = bool(consts.get("WARM_START")) and "WIDTH" in json.loads(Path(a.warm_start).read_text())
if status == "ok" and a.save_model:  # a stand-in checkpoint: the constants it was "trained" with
    Path(a.save_model).write_text(json.dumps(consts, sort_keys=True))
Path(a.result).write_text(json.dumps(result))
