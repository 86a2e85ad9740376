"""Input fuzzing (issue 11): every input a user, an agent or a sender controls, fuzzed with hypothesis.

Inputs: a lab's rloop.toml, a batch file, control-socket requests, a run socket's requests and `rloopd
submit` arguments, `rloopd import` archives, and event rows read back from the log. The properties: no
Python traceback reaches the user; every refusal is one line that names what was wrong (the file, the key,
the argument or the event); a refused archive writes nothing to the home; a daemon or run socket answers
every request and keeps serving.

Examples are few by default (the suite has a time budget) and derandomized, so CI is deterministic;
`RLOOPD_FUZZ_EXAMPLES=N` runs N per test, and `RLOOPD_FUZZ_SEED` (with pytest's `--hypothesis-seed`) draws
other examples than CI's: ops/chaos/fuzz.py runs such a campaign. The CLI runs in this process
(`rloopd.cli.main` with `sys.argv` set), which is where a traceback would surface.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import io
import json
import math
import os
import re
import shutil
import socket
import sqlite3
import sys
import tarfile
import time
import traceback
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from rloopd import control, events, runs
from rloopd.batch import BatchFile, Condition, Criteria, load_batch
from rloopd.errors import LabConfigError, RloopdError, one_line
from rloopd.home import Home
from rloopd.lab import AgentConfig, Lab, Metric, Param, Space, load_lab
from rloopd.log import NewEvent, canonical_event, canonical_json, chain_hash
from rloopd.loop import Loop
from rloopd.runsocket import MAX_SUBMIT_MESSAGE, RunSocket, SubmitRefused, submit_message
from rloopd.transfer import export_run

from .daemon_helpers import make_lab as instant_lab
from .test_lab_config import TRAIN
from .test_lab_config import make_lab as small_lab

STATS = os.environ.get("RLOOPD_FUZZ_STATS")  # ops/chaos/fuzz.py: a file that gets a line per example run
SEEDED = os.environ.get("RLOOPD_FUZZ_SEED") is not None  # ... which then seeds hypothesis itself


def fuzz(default: int, shrink: bool = True):
    """Hypothesis settings: `default` examples (RLOOPD_FUZZ_EXAMPLES overrides), derandomized, no deadline.
    Where an example costs a home and several commands, a failure is reported as found, not shrunk (that
    could take longer than the suite's timeout)."""
    phases = [p for p in Phase if shrink or p not in (Phase.shrink, Phase.explain)]
    return settings(max_examples=int(os.environ.get("RLOOPD_FUZZ_EXAMPLES") or default), deadline=None,
                    derandomize=not SEEDED, database=None, print_blob=True, phases=phases,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.large_base_example])


def ran(case: str) -> None:
    if STATS:
        with open(STATS, "a") as f:
            f.write(f"{case}\t{time.monotonic():.4f}\n")


def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """`rloopd ARGS` in this process: (exit code, stdout, stderr); an exception escaping `main` is a
    traceback the user would see, so it fails the test with it."""
    from rloopd.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_env = sys.argv, {k: os.environ.get(k) for k in (env or {})}
    sys.argv = ["rloopd", *args]
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # noqa: BLE001 - what the user would see
                pytest.fail(f"rloopd {' '.join(map(repr, args))[:300]} raised:\n{traceback.format_exc()}")
    finally:
        sys.argv = saved_argv
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return code, out.getvalue(), err.getvalue()


def refusal(code: int, err: str) -> str:
    """The one line a refused command printed, checked: exit code, no traceback, one printable line."""
    assert code != 0, err
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("rloopd: "), err
    assert one_line(lines[0]) == lines[0], f"unprintable characters in {lines[0]!r}"
    return lines[0]


def one_printable_line(message: str) -> None:
    assert message and one_line(message) == message and not message.splitlines()[1:], repr(message)


# --- values ----------------------------------------------------------------------------------------

ODD_TEXT = ["", " ", "\x00", "a\x00b", "a\nb", "\r", "\x1b[31m", "\u2028", "\x7f", "é", "💥", "x" * 5000,
            "../../etc/passwd", "/etc/hostname", "steps:0", "steps:-1", "steps:99999999999999999999", "1e400",
            "nan", "-inf", "margin:-1", "margin:nan", "rerun:0", "rerun:1000", "workspace/*.py", "frozen/**",
            "frozen/private/**", "[", "*", "**", "cmd:", "cmd:'unclosed", "optuna:nope", "from:", "from:x@y",
            "notes", "none", "auto", "minimize", "maximize", "better", "60", "1h", "0s", "-5m"]
ODD_NUMBERS = [0, -1, 1, 2, 10**6, 2**63 - 1, -(2**63), 0.0, -0.0, 0.5, 1e-300, 1e300, math.inf, -math.inf, math.nan]

scalars = st.one_of(
    st.sampled_from(ODD_TEXT), st.text(max_size=12), st.sampled_from(ODD_NUMBERS),
    st.integers(-(2**63), 2**63 - 1), st.floats(), st.booleans(), st.dates(),
)
json_scalars = st.one_of(st.sampled_from(ODD_TEXT), st.text(max_size=12), st.integers(-(2**70), 2**70),
                         st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.none())
toml_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


def toml_string(s: str) -> str:
    return '"' + "".join('\\"' if c == '"' else "\\\\" if c == "\\" else f"\\u{ord(c):04x}"
                         if ord(c) < 0x20 or ord(c) == 0x7F else c for c in s) + '"'


def toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else toml_string(k)


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, datetime.date):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(map(toml_value, v)) + "]"
    return "{" + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


def toml_dumps(doc: dict) -> str:
    """A TOML document of `doc`: a `key = value` line per top-level key, tables inline."""
    return "".join(f"{toml_key(k)} = {toml_value(v)}\n" for k, v in doc.items())


def set_path(doc: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for p in parents:
        if not isinstance(doc.get(p), dict):
            doc[p] = {}
        doc = doc[p]
    doc[last] = value


def del_path(doc: dict, path: str) -> None:
    *parents, last = path.split(".")
    for p in parents:
        doc = doc.get(p) if isinstance(doc, dict) else None
    if isinstance(doc, dict):
        doc.pop(last, None)


@st.composite
def mutated(draw, base: dict, keys: list[str], unknown_parents: list[str]):
    """(kind, key, document): `base` with one key set to a value of any type, deleted, or an unknown one added."""
    doc = copy.deepcopy(base)
    kind = draw(st.sampled_from(["set", "set", "set", "delete", "unknown"]))
    if kind == "unknown":
        parent = draw(st.sampled_from(unknown_parents))
        name = draw(st.text(min_size=1, max_size=10).filter(lambda n: n not in keys and "." not in n and ":" not in n))
        key = f"{parent}.{name}" if parent else name
        set_path(doc, key, draw(toml_values))
    else:
        key = draw(st.sampled_from(keys))
        if kind == "set":
            set_path(doc, key, draw(toml_values))
        else:
            del_path(doc, key)
    return kind, key, doc


def named_key(message: str, file: Path) -> str:
    """The key a `FILE: KEY: why` message names."""
    assert message.startswith(f"{file}: "), message
    return message[len(str(file)) + 2:].split(": ", 1)[0]


# --- 1. rloop.toml ---------------------------------------------------------------------------------

LAB = {"name": "mini", "editable": ["workspace/*.py"], "frozen": ["frozen/**"], "private": ["frozen/private/**"],
       "budget": "steps:10", "timeout": 30, "metric": {"name": "val_bpb", "direction": "minimize"},
       "params": {"LR": {"range": [1e-4, 1e-1], "log": True, "category": "learning rate"},
                  "DEPTH": {"range": [1, 8], "category": "depth"},
                  "OPT": {"choices": ["adamw", "sgd"], "category": "optimizer"}},
       "spaces": {"small": {"editable": ["workspace/*.py"]}}, "agent": {"session_timeout": 60.0}}
LAB_KEYS = sorted({*Lab.model_fields, *(f"metric.{k}" for k in Metric.model_fields),
                   *(f"agent.{k}" for k in AgentConfig.model_fields), "agent.env.HOME_DIR",
                   *(f"params.LR.{k}" for k in [*Param.model_fields, "range"] if k not in ("low", "high")),
                   "params.LR", "params.OPT.choices", "params.NEW", "categories.LR",
                   *(f"spaces.small.{k}" for k in Space.model_fields), "spaces.small"})
# Keys whose value another key's check depends on: a bad budget can be refused as a timeout that no
# longer exceeds it, a changed editable glob as a frozen file that is now editable too, and so on.
RELATED = {"budget": {"timeout"}, "timeout": {"budget"}, "editable": {"frozen", "params", "private"},
           "frozen": {"private", "editable", "params"}, "private": {"frozen"}, "regions": {"constants"},
           "constants": {"regions"}, "space": {"spaces"}, "spaces": {"space"}}


@pytest.fixture(scope="module")
def lab_dir(tmp_path_factory) -> Path:
    return small_lab(tmp_path_factory.mktemp("lab"))


def lab_refusal(lab_dir: Path, text: bytes) -> str | None:
    """Load the lab with this rloop.toml: None if it loads, else its one-line refusal (checked)."""
    file = lab_dir / "rloop.toml"
    file.write_bytes(text)
    try:
        load_lab(file)
    except LabConfigError as e:
        message = str(e)
        one_printable_line(message)
        assert message.startswith(f"{file}: "), message
        return message
    return None


@fuzz(60)
@given(mutated(LAB, LAB_KEYS, ["", "metric", "agent", "params.LR", "spaces.small"]))
def test_rloop_toml_with_wrong_keys_and_values_is_refused_naming_the_key(lab_dir, case):
    """A value of any type under any real key, a key removed, an unknown key: either the lab loads, or one
    line names rloop.toml and the key (or one whose check depends on it)."""
    ran("rloop.toml")
    kind, key, doc = case
    message = lab_refusal(lab_dir, toml_dumps(doc).encode())
    if message is None:
        return
    file = lab_dir / "rloop.toml"
    named = named_key(message, file)
    assert named not in ("not valid TOML", "cannot read"), message
    if kind == "unknown":
        assert named == one_line(key) and "unknown key" in message, (key, message)
        return
    root = key.split(".")[0]
    assert named.split(".")[0] in {root} | RELATED.get(root, set()), (key, message)


@fuzz(40)
@given(st.one_of(
    st.binary(max_size=200),
    st.tuples(st.integers(0, 400), st.binary(min_size=1, max_size=4)),
    st.sampled_from([b"[" * 5000, b"a = " + b"[" * 5000, b"x = {" * 3000, b"\xef\xbb\xbfname = 'x'\n",
                     b"name = \"\xff\"\n", b"\x00" * 10]),
))
def test_garbage_rloop_toml_is_refused_naming_the_file(lab_dir, data):
    """Random bytes, a valid file with bytes spliced in (invalid UTF-8, NUL, a cut token), deep nesting:
    a one-line refusal naming rloop.toml, never a parser's traceback."""
    ran("rloop.toml bytes")
    if isinstance(data, tuple):
        at, junk = data
        text = toml_dumps(LAB).encode()
        data = text[:at] + junk + text[at:]
    lab_refusal(lab_dir, data)  # loads, or refuses in one line naming the file


def test_an_unreadable_train_py_is_refused_naming_the_param(tmp_path):
    """Found by fuzzing: a [params] constant in a train.py that is not UTF-8, holds a NUL byte or nests
    too deeply raised UnicodeDecodeError / ValueError / RecursionError instead of naming the key."""
    for train in (b"LR = 3e-3\xff\n", b"LR = 3e-3\x00\n", b"LR = " + b"[" * 10000 + b"\n"):
        lab = small_lab(tmp_path, toml_dumps(LAB), TRAIN)
        (lab / "workspace" / "train.py").write_bytes(train)
        with pytest.raises(LabConfigError) as e:
            load_lab(lab)
        assert str(e.value).startswith(f"{lab / 'rloop.toml'}: params.") and "train.py" in str(e.value)
        one_printable_line(str(e.value))


@fuzz(8)
@given(st.sampled_from(["budget", "timeout", "name", "editable", "agent.grace", "params.LR.range"]), toml_values)
def test_rloopd_run_prints_the_refusal_of_a_bad_lab_in_one_line(lab_dir, tmp_path, key, value):
    """The same refusals through `rloopd run --lab` (in process): exit 2, one line, no traceback."""
    ran("rloop.toml cli")
    doc = copy.deepcopy(LAB)
    set_path(doc, key, value)
    message = lab_refusal(lab_dir, toml_dumps(doc).encode())
    if message is None:
        return
    code, _, err = cli("run", "--lab", str(lab_dir), "--home", str(tmp_path / "home"), "--agent", "random")
    assert refusal(code, err) == f"rloopd: error: {message}"


# --- 2. batch files --------------------------------------------------------------------------------

BATCH_KEYS = sorted({*(k for k in BatchFile.model_fields if k not in ("criteria", "conditions")),
                     *(f"criteria.{k}" for k in Criteria.model_fields),
                     *(f"conditions.0.{k}" for k in Condition.model_fields), "criteria", "conditions"})
BATCH_RELATED = {"conditions": {"criteria", "lab", "budget", "window", "memory", "space"},
                 "criteria": {"lab", "conditions"}, "budget": {"window", "conditions"},
                 "window": {"conditions"}, "lab": {"conditions"}, "memory": {"conditions"},
                 "space": {"conditions"}}


@pytest.fixture(scope="module")
def batch_lab(tmp_path_factory) -> Path:
    return instant_lab(tmp_path_factory.mktemp("batchlab"))


def batch_doc(lab: Path) -> dict:
    return {"question": "does it work?", "lab": str(lab), "repeats": 2, "seed": 0, "experiments": 3,
            "criteria": {"baseline": "a", "statistic": "median"},
            "conditions": [{"name": "a", "agent": "random"}, {"name": "b", "agent": "random:all"}]}


def batch_refusal(path: Path, text: bytes) -> str | None:
    path.write_bytes(text)
    try:
        load_batch(path)
    except LabConfigError as e:
        message = str(e)
        one_printable_line(message)
        assert message.startswith(f"{path.absolute()}: "), message
        return message
    return None


@fuzz(50)
@given(st.data())
def test_batch_files_with_wrong_keys_and_values_are_refused_naming_the_key(batch_lab, tmp_path, data):
    """As rloop.toml: a value of any type under any key of a batch file (a condition's too), a key removed,
    an unknown one: it loads, or one line names the batch file and the key."""
    ran("batch file")
    base = batch_doc(batch_lab)
    kind = data.draw(st.sampled_from(["set", "set", "set", "delete", "unknown"]))
    doc = copy.deepcopy(base)
    doc["conditions"] = {"0": doc["conditions"][0], "1": doc["conditions"][1]}  # paths conditions.0.X
    if kind == "unknown":
        parent = data.draw(st.sampled_from(["", "criteria", "conditions.0"]))
        name = data.draw(st.text(min_size=1, max_size=10).filter(lambda n: "." not in n and ":" not in n
                                                                  and n not in BATCH_KEYS
                                                                  and n not in BatchFile.model_fields
                                                                  and n not in Condition.model_fields
                                                                  and n not in Criteria.model_fields))
        key = f"{parent}.{name}" if parent else name
        set_path(doc, key, data.draw(toml_values))
    else:
        key = data.draw(st.sampled_from(BATCH_KEYS))
        if kind == "set":
            set_path(doc, key, data.draw(toml_values))
        else:
            del_path(doc, key)
    if isinstance(doc.get("conditions"), dict) and set(doc["conditions"]) == {"0", "1"}:
        doc["conditions"] = [doc["conditions"]["0"], doc["conditions"]["1"]]
    path = tmp_path / "batch.toml"
    message = batch_refusal(path, toml_dumps(doc).encode())
    if message is None:
        return
    named = named_key(message, path.absolute())
    assert named not in ("not valid TOML",) and not named.startswith("cannot read"), message
    if kind == "unknown":
        assert named == one_line(key) and "Extra inputs are not permitted" in message, (key, message)
        return
    root = key.split(".")[0]
    assert named.split(".")[0] in {root} | BATCH_RELATED.get(root, set()), (key, message)


@fuzz(25)
@given(st.one_of(st.binary(max_size=200), st.tuples(st.integers(0, 300), st.binary(min_size=1, max_size=4)),
                 st.sampled_from([b"x = " + b"[" * 5000, b"question = \"\xff\"\n", b"\x00"])))
def test_garbage_batch_files_are_refused_naming_the_file(batch_lab, tmp_path, data):
    """Random bytes, bytes spliced into a valid file, deep nesting: one line naming the file, also through
    `rloopd batch run` (in process)."""
    ran("batch bytes")
    if isinstance(data, tuple):
        at, junk = data
        text = toml_dumps(batch_doc(batch_lab)).encode()
        data = text[:at] + junk + text[at:]
    path = tmp_path / "batch.toml"
    if batch_refusal(path, data) is None:
        return
    code, _, err = cli("batch", "run", str(path), "--home", str(tmp_path / "home"))
    assert refusal(code, err).startswith(f"rloopd: error: {path.absolute()}: ")


# --- 3. the control socket -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """The daemon's request handling in this process: its control socket served, no runs driven (a request
    that names a real lab, say the repository's own as `"lab": ""`, creates a run that nothing starts)."""
    from rloopd.service import Daemon
    from rloopd.slots import SlotPool

    home = tmp_path_factory.mktemp("served") / "home"
    Home.open(home).close()
    d = Daemon(home, SlotPool("cpu", ["cpu0"]))
    d.start_worker = lambda run: None
    server = d.serve_socket()
    yield d
    server.shutdown()
    server.server_close()


def control_requests():
    from rloopd.commands import ARGS

    ops = st.one_of(st.sampled_from(sorted(ARGS)), json_values)
    known_args = st.sampled_from(sorted({a for spec in ARGS.values() for a in spec}))
    args = st.one_of(st.dictionaries(st.one_of(known_args, st.text(max_size=6)), json_values, max_size=4),
                     json_values)
    return st.fixed_dictionaries({"op": ops, "args": args, "request": st.one_of(st.just("r-1"), json_values)})


@fuzz(80)
@given(control_requests())
def test_malformed_control_requests_get_a_one_line_answer_naming_the_argument(daemon, msg):
    """A decoded request of any shape (known ops with arguments of any JSON type, unknown ops, args that
    are not an object, odd request ids): the daemon answers, and a refusal names the op or the argument,
    never a bare exception of a handler."""
    from rloopd.commands import ARGS

    ran("control request")
    if msg["op"] == "gc" and isinstance(msg["args"], dict):
        msg["args"]["dry_run"] = True  # never collect the home's blobs for real
    reply = daemon.answer(msg)
    assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool)
    if reply["ok"]:
        return
    error = reply["error"]
    one_printable_line(error)
    assert not re.search(r"request: [A-Z][A-Za-z]*(Error|Exception)\b", error), error
    op, args = msg["op"], msg["args"]
    if not isinstance(op, str) or op not in ARGS:
        assert error.startswith("unknown op"), error
    elif not isinstance(args, dict):
        assert "args must be a JSON object" in error, error
    elif error.startswith("malformed"):
        assert re.search(r"argument '[^']*'|argument \"|request must be", error), error


def talk(path: Path, data: bytes, timeout: float = 20) -> dict:
    """Send raw bytes to a Unix socket and read the one-line answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):  # it stopped reading an oversized message: it answered
            pass
        line = s.makefile("rb").readline()
    assert line.endswith(b"\n"), f"no answer to {data[:80]!r}: {line!r}"
    return json.loads(line)


raw_messages = st.one_of(
    st.binary(max_size=300).map(lambda b: b.replace(b"\n", b"") + b"\n"),
    json_values.map(lambda v: json.dumps(v).encode() + b"\n"),
    st.sampled_from([b"[" * 200_000 + b"\n", b'{"op": "ping", "args": ' + b"[" * 5000 + b"}\n",
                     b"\xff\xfe\xfd\n", b'{"op": "ping", "args": {}, "request": "\\ud800"}\n',
                     b'{"op": "pause", "args": {"run": NaN}, "request": "r"}\n',
                     b'{"op": "gc", "args": {"keep_last": 1, "orphan_age": Infinity}, "request": "r"}\n',
                     b"x" * (2 << 20), b'{"op": "' + b"p" * (1 << 20) + b'"}\n', b"1" * 5000 + b"\n"]),
)


@fuzz(25)
@given(raw_messages)
def test_raw_bytes_on_the_control_socket_get_an_answer_and_it_keeps_serving(daemon, data):
    """Malformed JSON, invalid UTF-8, deep nesting, over 1 MiB: an answer (ok false), and the next ping works."""
    ran("control bytes")
    path = control.socket_path(daemon.home_path)
    reply = talk(path, data)
    if not reply["ok"]:
        one_printable_line(reply["error"])
    assert talk(path, b'{"op": "ping", "args": {}, "request": "p"}\n')["ok"] is True


def test_a_client_that_sends_half_a_request_is_answered_after_the_silence(daemon, monkeypatch):
    """A client that stops mid-request gets an answer once the daemon's patience runs out, and others are
    served meanwhile."""
    monkeypatch.setattr(control, "CLIENT_SILENCE", 0.5)
    path = control.socket_path(daemon.home_path)
    t0 = time.monotonic()
    reply = talk(path, b'{"op": "ping", "args": {}')  # no newline, and nothing more
    assert not reply["ok"] and "timed out" in reply["error"] and time.monotonic() - t0 < 10
    assert talk(path, b'{"op": "ping", "args": {}, "request": "p"}\n')["ok"] is True


def test_control_call_names_an_argument_that_is_not_utf8(daemon):
    """Found by fuzzing: an argument with a lone surrogate (argv bytes that were not UTF-8) was reported as
    `the daemon ... did not answer: 'utf-8' codec can't encode ...`, after nothing was sent."""
    from rloopd.errors import DaemonError

    with pytest.raises(DaemonError, match=r"pause: argument 'run' is not valid UTF-8 text"):
        control.call(daemon.home_path, "pause", {"run": "x\udcff"})
    with pytest.raises(DaemonError, match=r"malformed pause request: argument 'run' must be a string, not an array"):
        control.call(daemon.home_path, "pause", {"run": ["x" * 100]})
    with pytest.raises(DaemonError, match="message over"):  # refused unread: its answer is read, not a broken pipe
        control.call(daemon.home_path, "pause", {"run": "x" * (2 << 20)})


# --- 4. the run socket and `rloopd submit` ---------------------------------------------------------

@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """A run in session mode with a live session and its socket, driven in this process: submits run real
    (instant) experiments."""
    tmp = tmp_path_factory.mktemp("session")
    home = Home.open(tmp / "home")
    run = runs.create_run(home, instant_lab(tmp), agent="cmd:true", experiments=100_000, budget=None, seed=0,
                          name=None, sandbox="none")
    runs.project_run(home, run)
    loop = Loop(home, run)
    loop.append(NewEvent("session.started", {"session": 1, "agent": "cmd:true"}))
    loop.sessions.session = 1
    sock = RunSocket(tmp / "run.sock", {"submit": loop.sessions.submit, "result": loop.sessions.result})
    yield home, run, loop, sock
    sock.close()
    home.close()


submit_texts = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(max_codepoint=0x9F), max_size=40),  # control characters
    st.sampled_from(["a\x00b", "\x00", "tab\there\nnew line\r\x1b[2J\x07", "\u2028\u2029", "x" * 60_000,
                     "é" * 40_000, "x" * (MAX_SUBMIT_MESSAGE + 1), "\udcff", "ok \ud800", "   "]),
    st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=2), st.booleans(),
)


@fuzz(25, shrink=False)
@given(submit_texts)
def test_submit_messages_of_any_text_run_or_are_refused_naming_the_message(session, message):
    """Control characters, NUL bytes, 60 KB, not UTF-8, not text: the experiment runs and the log holds
    the message, or the submit is refused naming --message before anything is recorded."""
    ran("submit message")
    home, run, loop, _ = session
    before = home.log.head(run)
    try:
        result = loop.sessions.submit({"message": message})
    except SubmitRefused as e:
        assert str(e).startswith("--message: "), str(e)
        one_printable_line(str(e))
        assert home.log.head(run) == before, "a refused submit recorded something"
        return
    assert result["status"] == "ok" and result["ticket"]
    [submitted] = [e.data for e in home.log.read(run, types=["experiment.submitted"]) if e.data["ticket"] == result["ticket"]]
    assert submitted["message"] == loop.sessions.redactor.redact_text(message.strip())


@fuzz(25)
@given(st.one_of(raw_messages, st.fixed_dictionaries(
    {"op": st.sampled_from(["submit", "result"]), "args": json_values}).map(lambda m: json.dumps(m).encode() + b"\n")))
def test_raw_bytes_on_a_run_socket_get_an_answer_and_it_keeps_serving(session, data):
    ran("run socket bytes")
    _, _, loop, sock = session
    loop.sessions.latest = None
    reply = talk(sock.path, data, timeout=60)
    if not reply["ok"]:
        one_printable_line(reply["error"])
        assert not reply["error"].startswith("internal error"), reply["error"]
    assert not talk(sock.path, b'{"op": "result", "args": {"ticket": "none"}}\n')["ok"]  # still serving


@pytest.fixture(scope="module")
def checking_socket(tmp_path_factory):
    """A run socket whose submit checks the message as a run does, and records what it took."""
    seen: list[str] = []
    sock = RunSocket(tmp_path_factory.mktemp("sock") / "s.sock", {"submit": lambda a: seen.append(
        submit_message(a["message"])) or {"ticket": "t", "step": 1, "status": "ok", "value": 1.0, "accepted": True,
                                          "best": 1.0, "best_step": 1}})
    yield sock, seen
    sock.close()


@fuzz(20)
@given(st.one_of(st.text(max_size=30), st.sampled_from(["x" * 70_000, "a\x00b", "\udcff\udcfe", "-m", "--",
                                                          "\n", "é\u2028"])))
def test_rloopd_submit_refuses_a_bad_message_in_one_line(checking_socket, message):
    """`rloopd submit -m TEXT` against a run socket that checks messages as the run does: exit 0, or one
    line naming --message (or the argument that is not UTF-8)."""
    ran("submit cli")
    sock, seen = checking_socket
    seen.clear()
    code, out, err = cli("submit", "-m", message, env={"RLOOPD_SOCKET": str(sock.path)})
    if code == 0:
        assert seen == [message.strip()] and "step 1: ok" in out
        return
    line = refusal(code, err)
    assert "--message" in line or "not valid UTF-8" in line or "-m" in line, line


# --- 5. `rloopd import` archives -------------------------------------------------------------------

@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("export")
    with Home.open(tmp / "home") as h:
        run = runs.create_run(h, instant_lab(tmp), agent="random", experiments=2, budget=None, seed=1, name="r")
        Loop(h, run).run()
        export_run(h, run, tmp / "r.rloop")
    return tmp / "r.rloop"


def members_of(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def pack(members: list[tuple[str, bytes]], dest: Path) -> None:
    with tarfile.open(dest, "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def reseal(members: dict[str, bytes]) -> dict[str, bytes]:
    """archive.json's member digests recomputed, as a forger would (when it is still a JSON object)."""
    try:
        doc = json.loads(members["archive.json"])
        doc["members"] = {n: hashlib.sha256(b).hexdigest() for n, b in members.items() if n != "archive.json"}
    except Exception:  # noqa: BLE001 - a tampered archive.json stays tampered
        return members
    return {**members, "archive.json": json.dumps(doc).encode()}


def forge_events(members: dict[str, bytes], edit) -> None:
    """Edit the events, then recompute every chain and head hash: only the payload checks can tell."""
    lines = [json.loads(x) for x in members["events.jsonl"].decode().splitlines()]
    edit(lines)
    links: dict[str, str] = {}
    for e in lines:
        if not isinstance(e, dict) or not isinstance(e.get("data"), dict):
            continue
        with contextlib.suppress(Exception):
            e["prev"] = links.get(e["stream"], e["prev"])
            e["hash"] = links[e["stream"]] = chain_hash(e["prev"], canonical_event(
                e["stream"], e["n"], e["type"], e["v"], e["at"], canonical_json(e["data"])))
    members["events.jsonl"] = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in lines).encode()
    doc = json.loads(members["archive.json"])
    for s in doc["streams"]:
        s["head"] = links.get(s["stream"], s["head"])
    members["archive.json"] = json.dumps(doc).encode()


MEMBER_NAMES = ["archive.json", "events.jsonl", "snapshots.bundle", "blobs/" + "0" * 64, "blobs/x", "../evil",
                "/abs", "events.jsonl/", "blobs", ""]
ARCHIVE_KEYS = ["format", "version", "rloopd", "run", "name", "streams", "collected", "members", "streams.0.head",
                "streams.0.events", "streams.0.stream", "members.events.jsonl", "extra"]


@st.composite
def archive_mutations(draw):
    return draw(st.one_of(
        st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4)),
        st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
        st.tuples(st.just("drop"), st.integers(0, 100)),
        st.tuples(st.just("add"), st.sampled_from(MEMBER_NAMES), st.binary(max_size=40), st.booleans()),
        st.tuples(st.just("rename"), st.integers(0, 100), st.sampled_from(MEMBER_NAMES), st.booleans()),
        st.tuples(st.just("duplicate"), st.integers(0, 100)),
        st.tuples(st.just("archive.json"), st.sampled_from(ARCHIVE_KEYS), json_values, st.booleans()),
        st.tuples(st.just("event"), st.integers(0, 100), st.sampled_from(["id", "stream", "n", "type", "v", "at", "data",
                                                                          "prev", "hash", "data.step", "data.status",
                                                                          "data.metrics", "data.parent", "data.name",
                                                                          "data.commit", "data.blob", "data.extra"]),
                  json_values, st.booleans()),
        st.tuples(st.just("line"), st.integers(0, 100), st.one_of(st.binary(max_size=40), st.just(b"[" * 50_000))),
    ))


def mutate_archive(original: Path, dest: Path, m: tuple) -> None:
    raw = original.read_bytes()
    kind = m[0]
    if kind == "flip":
        data = bytearray(raw)
        for at, mask in m[1]:
            data[at % len(data)] ^= mask
        dest.write_bytes(bytes(data))
        return
    if kind == "truncate":
        dest.write_bytes(raw[: int(len(raw) * m[1])])
        return
    members = members_of(original)
    names = list(members)
    if kind == "drop":
        members.pop(names[m[1] % len(names)])
    elif kind == "add":
        members[m[1]] = m[2]
        members = reseal(members) if m[3] else members
    elif kind == "rename":
        old = names[m[1] % len(names)]
        members[m[2]] = members.pop(old)
        members = reseal(members) if m[3] else members
    elif kind == "duplicate":
        name = names[m[1] % len(names)]
        pack([*members.items(), (name, members[name])], dest)
        return
    elif kind == "archive.json":
        doc = json.loads(members["archive.json"])
        with contextlib.suppress(Exception):
            set_path(doc, m[1], m[2]) if not m[1].startswith("streams.0") else doc["streams"][0].__setitem__(
                m[1].split(".")[-1], m[2])
        members["archive.json"] = json.dumps(doc).encode()
        members = reseal(members) if m[3] else members
    elif kind == "event":
        _, i, field, value, forged = m

        def edit(lines: list) -> None:
            e = lines[i % len(lines)]
            if field.startswith("data."):
                e["data"][field[5:]] = value
            else:
                e[field] = value
        if forged:
            forge_events(members, edit)
        else:
            lines = [json.loads(x) for x in members["events.jsonl"].decode().splitlines()]
            edit(lines)
            members["events.jsonl"] = "".join(json.dumps(e) + "\n" for e in lines).encode()
        members = reseal(members)
    elif kind == "line":
        lines = members["events.jsonl"].split(b"\n")
        lines[m[1] % len(lines)] = m[2]
        members["events.jsonl"] = b"\n".join(lines)
        members = reseal(members)
    pack(list(members.items()), dest)


def home_state(home: Path) -> tuple:
    with Home.open(home, create=False) as h:
        seq = h.log.last_seq()
    blobs = sorted(p.relative_to(home).as_posix() for p in (home / "blobs").rglob("*"))
    refs = sorted(p.relative_to(home).as_posix() for p in (home / "git").rglob("*")) if (home / "git").exists() else []
    return seq, blobs, refs, (home / "runs").exists() and sorted(os.listdir(home / "runs"))


@fuzz(40, shrink=False)
@given(archive_mutations())
def test_an_altered_archive_is_refused_in_one_line_and_writes_nothing(archive, tmp_path, mutation):
    """Bytes flipped, cut short, members dropped, added, renamed or doubled, archive.json or an event
    tampered (with the digests, chains and heads recomputed, as a forger would): import refuses with one
    line naming the archive, and the home's log, blobs, snapshots and runs are as they were; or, where the
    change left a consistent archive, it imports."""
    ran("import archive")
    bad = tmp_path / "bad.rloop"
    mutate_archive(archive, bad, mutation)
    home = tmp_path / f"home-{hashlib.sha256(bad.read_bytes()).hexdigest()[:8]}-{time.monotonic_ns()}"
    Home.open(home).close()
    before = home_state(home)
    code, _, err = cli("import", str(bad), "--home", str(home))
    if code == 0:  # a change that kept the archive consistent (a tar detail, a forged but valid payload):
        audit_code, _, audit_err = cli("audit", "--home", str(home))  # what it imported must verify
        assert audit_code == 0, audit_err
        return
    line = refusal(code, err)
    assert line.startswith(f"rloopd: error: archive {bad}: "), line
    assert home_state(home) == before, "a refused import wrote to the home"


# --- 6. event rows read back from the log -----------------------------------------------------------

@pytest.fixture(scope="module")
def finished_home(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("logged")
    with Home.open(tmp / "home") as h:
        run = runs.create_run(h, instant_lab(tmp), agent="random", experiments=2, budget=None, seed=1, name="r")
        Loop(h, run).run()
        rows = h.log.conn.execute("SELECT n, type, data FROM events WHERE stream = ? ORDER BY n", (run,)).fetchall()
    return tmp / "home", run, rows


@st.composite
def damaged_rows(draw, rows):
    n = draw(st.integers(0, len(rows) - 1))
    _, type_, text = rows[n]
    data = json.loads(text)
    kind = draw(st.sampled_from(["text", "json", "drop", "set", "add"]))
    if kind == "text":
        new = draw(st.one_of(st.text(max_size=30), st.sampled_from(["", "{", "[" * 100_000, '{"a": ' * 5000])))
    elif kind == "json":
        new = canonical_json(draw(json_values))
    elif kind == "drop" and data:
        new = canonical_json({k: v for k, v in data.items() if k != draw(st.sampled_from(sorted(data)))})
    else:
        key = draw(st.sampled_from(sorted(data))) if kind == "set" and data else draw(st.text(min_size=1, max_size=8))
        new = canonical_json({**data, key: draw(json_values)})
    return n, type_, new, draw(st.booleans())


def damage_log(src: Path, dest: Path, run: str, n: int, text: str, rehash: bool) -> None:
    """A copy of the home whose event `n` of `run` holds `text` (the chain rehashed after it, or not)."""
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("rloopd.lock"))
    conn = sqlite3.connect(dest / "events.db", isolation_level=None)
    conn.execute("DROP TRIGGER events_no_update")
    conn.execute("BEGIN")
    conn.execute("UPDATE events SET data = ? WHERE stream = ? AND n = ?", (text, run, n))
    if rehash:
        link = ""
        for m, type_, v, at, data, prev in conn.execute(
                "SELECT n, type, v, at, data, prev FROM events WHERE stream = ? ORDER BY n", (run,)).fetchall():
            link = prev if m == 0 else link
            h = chain_hash(link, canonical_event(run, m, type_, v, at, data))
            conn.execute("UPDATE events SET prev = ?, hash = ? WHERE stream = ? AND n = ?", (link, h, run, m))
            link = h
    conn.execute("COMMIT")
    conn.close()


def payload_valid(type_: str, text: str) -> bool:
    try:
        data = json.loads(text)
        events.decode(type_, events.current_version(type_), data)
    except Exception:  # noqa: BLE001 - anything a reader could trip on
        return False
    return isinstance(data, dict)


@fuzz(20, shrink=False)
@given(st.data())
def test_a_damaged_event_is_named_by_every_reader_never_a_traceback(finished_home, tmp_path, data):
    """An event whose stored data is not JSON, not an object, lacks a key, has a key of another type or an
    unknown one, with the chain rehashed or not: audit fails naming the stream and the event, and status,
    log, show and replay either work or refuse in one line naming them, never a KeyError or TypeError."""
    ran("log row")
    src, run, rows = finished_home
    n, type_, text, rehash = data.draw(damaged_rows(rows))
    if text == rows[n][2]:
        return  # the draw left the event as it was
    home = tmp_path / f"h{time.monotonic_ns()}"
    damage_log(src, home, run, n, text, rehash)
    where = re.compile(rf"stream[ =]{run}(, | )n={n}\b")
    valid = payload_valid(type_, text)
    code, _, err = cli("audit", "--home", str(home))
    if not valid or not rehash:
        assert where.search(refusal(code, err)), (type_, text[:80], err)
    for args in (["status", "--all"], ["log", run], ["show", run, "1"], ["replay", run]):
        code, _, err = cli(*args, "--home", str(home))
        if code == 0:
            assert valid or args[0] != "replay", (type_, text[:80])  # replay verifies what it folds
            continue
        line = refusal(code, err)  # one line: the damaged event, or what the reader could not find
        if args[0] == "replay" and not valid:
            assert where.search(line) or "replay diverged" in line, (args, type_, text[:80], line)


def test_audit_refuses_a_payload_stored_as_json_null(finished_home, tmp_path):
    """Found by fuzzing: audit checked a payload only when its text parsed to something other than None,
    so an event whose data is JSON `null`, chain rehashed, passed `rloopd audit`."""
    src, run, rows = finished_home
    home = tmp_path / "h"
    damage_log(src, home, run, 2, "null", rehash=True)
    code, _, err = cli("audit", "--home", str(home))
    assert f"stream {run} n=2" in refusal(code, err) and "Input should be a valid dictionary" in err


def test_a_damaged_row_met_by_a_live_reader_names_the_event(finished_home, tmp_path):
    """The log's reader itself: a row that is not a JSON object is PayloadInvalid naming the stream and n."""
    from rloopd.errors import PayloadInvalid

    src, run, _ = finished_home
    for text in ("not json", "[1, 2]", "[" * 100_000):
        home = tmp_path / f"h{len(text)}"
        damage_log(src, home, run, 1, text, rehash=False)
        with Home.open(home, create=False) as h, pytest.raises(PayloadInvalid, match=rf"stream {run} n=1: "):
            list(h.log.read(run))


def test_a_reader_that_trips_on_a_damaged_event_names_it(finished_home, tmp_path):
    """Found by fuzzing: `status`, `replay`, `fork` and `report` met a payload of the wrong shape (a step that
    is a string, a run.created that is a list) with a TypeError or AttributeError traceback. Now the log's
    reader names an event that is not an object, and the CLI audits the log when a command fails on data it
    did not expect, naming the first damaged event (exit 1, as audit)."""
    src, run, rows = finished_home
    home = tmp_path / "h"
    damage_log(src, home, run, 5, canonical_json({**json.loads(rows[5][2]), "step": "x"}), rehash=True)
    for args in (["status"], ["replay", run], ["fork", run, "2", "-n", "0"]):
        code, _, err = cli(*args, "--home", str(home))
        assert re.search(rf"stream[ =]{run}(, | )n=5\b", refusal(code, err)), (args, err)
    code, _, err = cli("status", "--home", str(home))
    assert code == 1 and err.startswith(f"rloopd: error: the event log is damaged: stream {run} n=5 ")


def test_a_payload_without_a_defaulted_field_reads_with_its_default(finished_home, tmp_path):
    """Found by fuzzing: readers index fields that have defaults (`show` read d["attempt"], d["metrics"],
    d["reason"]; the fold d["best_after"]; `status` d["agent"]), so a payload without one, valid by its model
    (an event written before the field was added, as DESIGN section 3 allows), raised KeyError. The log now
    reads every payload with its model's defaults filled in."""
    src, run, rows = finished_home
    for n, key in ((4, "best_after"), (6, "metrics"), (6, "reason"), (0, "agent")):
        data = {k: v for k, v in json.loads(rows[n][2]).items() if k != key}
        home = tmp_path / f"h{n}{key}"
        damage_log(src, home, run, n, canonical_json(data), rehash=True)
        assert cli("audit", "--home", str(home))[0] == 0  # valid: the field has a default
        with Home.open(home, create=False) as h:
            [e] = list(h.log.read(run, from_n=n, until_n=n))
            assert key in e.data and e.data[key] == events.TYPES[e.type][1].model_fields[key].get_default(
                call_default_factory=True)
        for args in (["status", "--all"], ["show", run, "1"], ["log", run]):
            code, _, err = cli(*args, "--home", str(home))
            assert code == 0, (key, args, err)


def test_fuzz_helpers_write_what_they_mean():
    """The TOML writer the fuzzers use writes what tomllib reads back (a wrong writer would fuzz nothing)."""
    import tomllib

    doc = {"a": "q\"\\\x00\n\x7fé", "b": [1, 2.5, True, {"c": ""}], "d e": datetime.date(2020, 1, 2), "f": -0.0}
    assert tomllib.loads(toml_dumps(doc)) == doc
    assert math.isnan(tomllib.loads(toml_dumps({"x": math.nan}))["x"])
    assert str(RloopdError("a\nb\x00\udcff")) == "a\\nb\\x00\\udcff" == one_line(str(RloopdError("a\nb\x00\udcff")))
