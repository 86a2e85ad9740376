"""rloopd export and import: a run moves to another home whole, and an altered archive is refused with why."""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from rloopd import runs
from rloopd.fork import fork_run
from rloopd.home import Home
from rloopd.housekeeping import collect
from rloopd.lock import HomeLock
from rloopd.log import canonical_event, canonical_json, chain_hash
from rloopd.loop import Loop
from rloopd.memory.experiments import ExperimentsTable
from rloopd.replay import replay

from .conftest import rloopd
from .daemon_helpers import Served, events, make_lab, state


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    """A parent run, a fork of it at step 3 (run on), and the fork exported: shared, never changed."""
    tmp = tmp_path_factory.mktemp("origin")
    with Home.open(tmp / "home") as h:
        parent = runs.create_run(h, make_lab(tmp), agent="random", experiments=5, budget=None, seed=2, name="parent")
        Loop(h, parent).run()
        fork = fork_run(h, parent, 3, experiments=2, name="fork")
        Loop(h, fork).run()
    archive = tmp / "fork.rloop"
    proc = rloopd("export", "fork", "-o", str(archive), "--json", home=tmp / "home", check=True)
    return SimpleNamespace(home=tmp / "home", parent=parent, fork=fork, archive=archive,
                           summary=json.loads(proc.stdout))


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_an_exported_fork_imports_elsewhere_and_replays_with_the_same_verdict(origin, tmp_path):
    s = origin.summary
    assert s["run"] == origin.fork and [x["stream"] for x in s["streams"]] == [origin.parent, origin.fork]
    assert s["events"] > 20 and s["blobs"] > 5 and s["commits"] >= 6 and s["bytes"] == origin.archive.stat().st_size
    target = tmp_path / "target"
    proc = rloopd("import", str(origin.archive), "--json", home=target)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["run"] == origin.fork and not result["already_present"]
    assert result["added"]["events"] == s["events"] and result["added"]["commits"] == s["commits"]
    for home in (origin.home, target):
        proc = rloopd("replay", origin.fork, "--json", home=home)
        assert proc.returncode == 0 and json.loads(proc.stdout)["ok"], (home, proc.stdout, proc.stderr)
    audits = [json.loads(rloopd("audit", "--json", home=home, check=True).stdout) for home in (origin.home, target)]
    there, here = ({x["stream"]: x["head"] for x in a["streams"]} for a in audits)
    assert here[origin.fork] == there[origin.fork] == s["streams"][1]["head"]
    assert here[origin.parent] == s["streams"][0]["head"], "the parent's prefix up to the fork position"
    a, b = origin.home / "runs" / origin.fork, target / "runs" / origin.fork
    for sub in ("workspace", "frozen", "memory"):
        assert files(a / sub) == files(b / sub), sub
    assert (a / "program.md").read_bytes() == (b / "program.md").read_bytes()
    with Home.open(origin.home) as h1, Home.open(target) as h2:
        assert ExperimentsTable(h1.log).rows(origin.fork) == ExperimentsTable(h2.log).rows(origin.fork)
        last, blobs = h2.log.last_seq(), files(target / "blobs")
        [imported] = [e.data for e in h2.log.read("home", types=["run.imported"])]
        assert imported["run"] == origin.fork and imported["events"] == s["events"]

    again = rloopd("import", str(origin.archive), "--json", "--expect", f"{origin.fork}={there[origin.fork]}",
                   home=target, check=True)
    assert json.loads(again.stdout)["already_present"] and json.loads(again.stdout)["added"]["events"] == 0
    with Home.open(target) as h2:
        assert h2.log.last_seq() == last and files(target / "blobs") == blobs, "importing twice adds nothing"
        # The archive is self-contained: the imported run forks and goes on here, without the lab directory.
        cont = fork_run(h2, origin.fork, 5, experiments=1)
        assert Loop(h2, cont).run().status == "finished"
        assert replay(h2, cont).ok


# --- altered archives ------------------------------------------------------------------------------


def read_archive(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def write_archive(members: dict[str, bytes], dest: Path, *, digests: bool = True) -> Path:
    """Pack `members` again; with `digests`, archive.json's member digests are recomputed, as a forger would."""
    doc = json.loads(members["archive.json"])
    if digests:
        doc["members"] = {n: hashlib.sha256(b).hexdigest() for n, b in members.items() if n != "archive.json"}
    members = {**members, "archive.json": json.dumps(doc).encode()}
    with tarfile.open(dest, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return dest


def lines_of(members: dict[str, bytes]) -> list[dict]:
    return [json.loads(line) for line in members["events.jsonl"].decode().splitlines()]


def set_lines(members: dict[str, bytes], lines: list[dict], heads: bool = False) -> None:
    members["events.jsonl"] = "".join(canonical_json(e) + "\n" for e in lines).encode()
    if heads:  # archive.json's head hashes too
        doc = json.loads(members["archive.json"])
        for s in doc["streams"]:
            s["head"] = [e["hash"] for e in lines if e["stream"] == s["stream"]][-1]
        members["archive.json"] = json.dumps(doc).encode()


def rehash(lines: list[dict], stream: str) -> None:
    """Recompute a stream's whole chain after an edit: a consistent rewrite only outside head hashes catch."""
    link = None
    for e in lines:
        if e["stream"] == stream:
            e["prev"] = e["prev"] if link is None else link
            e["hash"] = link = chain_hash(e["prev"], canonical_event(
                stream, e["n"], e["type"], e["v"], e["at"], canonical_json(e["data"])))


def first_finish(lines: list[dict], run: str) -> int:
    return next(i for i, e in enumerate(lines) if e["stream"] == run and e["type"] == "experiment.finished")


def edited_metric(origin, members, tmp):
    text = members["events.jsonl"].decode().splitlines()
    i = first_finish(lines_of(members), origin.fork)
    text[i] = re.sub(r'"val_bpb":([0-9.]+)', lambda m: f'"val_bpb":{float(m[1]) / 2}', text[i])
    members["events.jsonl"] = ("\n".join(text) + "\n").encode()
    return [], False, 1, "events.jsonl: its sha256 does not match archive.json (the member was altered)"


def edited_metric_and_digest(origin, members, tmp):
    edited_metric(origin, members, tmp)
    e = lines_of(members)[first_finish(lines_of(members), origin.fork)]
    line = first_finish(lines_of(members), origin.fork) + 1
    return [], True, 1, f"events.jsonl line {line} (run {origin.fork} n={e['n']}): hash does not match its contents"


def rewritten_chain(origin, members, tmp):
    lines = lines_of(members)
    lines[first_finish(lines, origin.fork)]["data"]["metrics"]["val_bpb"] = 0.5
    rehash(lines, origin.fork)
    set_lines(members, lines, heads=True)
    head = origin.summary["streams"][1]["head"]
    return ["--expect", f"{origin.fork}={head}"], True, 1, f"is not the expected {head}"


def swapped_blob(origin, members, tmp):
    a, b = sorted(n for n in members if n.startswith("blobs/"))[:2]
    members[a], members[b] = members[b], members[a]
    return [], True, 1, f"{a}: its bytes hash to {b[6:]}, not to its name"


def missing_commit(origin, members, tmp):
    with Home.open(origin.home) as h:
        base = next(h.log.read(origin.parent)).data["base_commit"]
    bundle = tmp / "base.bundle"
    subprocess.run(["git", f"--git-dir={origin.home / 'git'}", "bundle", "create", "-q", str(bundle),
                    f"refs/rloopd/{origin.parent}/base"], check=True, capture_output=True)
    members["snapshots.bundle"] = bundle.read_bytes()
    missing = sorted({e["data"]["commit"] for e in lines_of(members) if e["type"] == "experiment.started"} - {base})[0]
    return [], True, 1, f"commit {missing} (named by run"


def newer_format(origin, members, tmp):
    doc = json.loads(members["archive.json"])
    members["archive.json"] = json.dumps({**doc, "version": 2}).encode()
    return [], False, 2, "archive format v2 is newer than this rloopd supports (v1); upgrade rloopd"


def newer_event_version(origin, members, tmp):
    lines = lines_of(members)
    lines[-1]["v"] = 99  # the fork's run.finished, written by a later rloopd
    rehash(lines, origin.fork)
    set_lines(members, lines, heads=True)
    return [], True, 2, "run.finished v99 is newer than this rloopd supports (v1); upgrade rloopd"


@pytest.mark.parametrize("alter", [edited_metric, edited_metric_and_digest, rewritten_chain, swapped_blob,
                                   missing_commit, newer_format, newer_event_version])
def test_an_altered_archive_is_refused_and_the_home_stays_unchanged(origin, tmp_path, alter):
    members = read_archive(origin.archive)
    args, digests, code, message = alter(origin, members, tmp_path)
    bad = write_archive(members, tmp_path / "bad.rloop", digests=digests)
    target = tmp_path / "target"
    Home.open(target).close()
    before = files(target)
    proc = rloopd("import", str(bad), *args, home=target)
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.startswith(f"rloopd: error: archive {bad}: ") and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    with Home.open(target) as h:
        assert h.log.last_seq() == 0
    after = {k: v for k, v in files(target).items() if k != "rloopd.lock"}
    assert {k for k in after if not k.startswith("events.db")} == {k for k in before if not k.startswith("events.db")}
    assert not (target / "runs").exists() and not (target / "git").exists()


def test_unreadable_archives_are_bad_input(origin, tmp_path):
    data = origin.archive.read_bytes()
    (tmp_path / "cut.rloop").write_bytes(data[: len(data) * 2 // 3])
    (tmp_path / "notes.txt").write_text("not an archive\n")
    for name, words in (("cut.rloop", "truncated"), ("notes.txt", "not an rloopd archive"),
                        ("absent.rloop", "cannot read it")):
        proc = rloopd("import", str(tmp_path / name), home=tmp_path / "target")
        assert proc.returncode == 2 and f"archive {tmp_path / name}: " in proc.stderr and words in proc.stderr, \
            proc.stderr
    with Home.open(tmp_path / "target") as h:
        assert h.log.last_seq() == 0 and not (tmp_path / "target" / "runs").exists()
    lock = HomeLock(tmp_path / "target")  # a foreground run holds the home: import does not write behind it
    lock.acquire("foreground run")
    try:
        proc = rloopd("import", str(origin.archive), home=tmp_path / "target")
        assert proc.returncode == 2 and "already in use" in proc.stderr
    finally:
        lock.release()


def test_export_refuses_what_would_not_import(origin, tmp_path):
    out = tmp_path / "x.rloop"
    proc = rloopd("export", "nosuchrun", "-o", str(out), home=origin.home)
    assert proc.returncode == 2 and "nosuchrun" in proc.stderr, proc.stderr
    with Home.open(origin.home) as h:
        blob = next(h.log.read(origin.fork, types=["checkpoint.saved"])).data["blob"]
        kept = h.blobs.get(blob)
        h.blobs.path(blob).unlink()
        try:
            proc = rloopd("export", origin.fork, "-o", str(out), home=origin.home)
        finally:
            h.blobs.put(kept)
    assert proc.returncode == 1 and f"blob {blob}" in proc.stderr and "is missing" in proc.stderr, proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == [], "no archive, not even half of one"


def test_checkpoints_collected_by_gc_travel_as_collected(home, tmp_path):
    parent = runs.create_run(home, make_lab(tmp_path), agent="random", experiments=5, budget=None, seed=2, name="p")
    Loop(home, parent).run()
    fork = fork_run(home, parent, 3, experiments=2)
    Loop(home, fork).run()
    assert collect(home, keep_last=0).checkpoints, "gc collected no checkpoint"
    proc = rloopd("export", "home", "-o", str(tmp_path / "home.rloop"), home=home.path)
    assert proc.returncode == 2 and "'home' is not a run" in proc.stderr, proc.stderr
    archive = tmp_path / "f.rloop"
    summary = json.loads(rloopd("export", fork, "-o", str(archive), "--json", home=home.path, check=True).stdout)
    assert summary["collected"] >= 1
    target = tmp_path / "target"
    rloopd("import", str(archive), home=target, check=True)
    assert rloopd("audit", home=target).returncode == 0
    assert rloopd("replay", fork, home=target).returncode == 0


def test_a_serving_daemon_imports_and_never_drives_the_imported_runs(origin, tmp_path):
    target = tmp_path / "target"
    members = read_archive(origin.archive)
    edited_metric(origin, members, tmp_path)
    bad = write_archive(members, tmp_path / "bad.rloop", digests=False)
    d = Served(target).start()
    try:  # the daemon holds the home's lock: an import written directly would be refused as HomeBusy
        proc = rloopd("import", str(origin.archive), "--json", home=target)
        assert proc.returncode == 0 and json.loads(proc.stdout)["run"] == origin.fork, proc.stderr
        proc = rloopd("import", str(bad), home=target)
        assert proc.returncode == 1 and "does not match archive.json" in proc.stderr, proc.stderr
    finally:
        d.close()
    assert state(target, origin.parent).status == "running", "the parent's prefix ends mid-run"
    counts = {s["stream"]: s["events"] for s in origin.summary["streams"]}
    d = Served(target).start()
    d.close()
    assert events(target, "home", "daemon.started")[-1]["data"]["recovery"]["runs"] == []
    assert {r: len(events(target, r)) for r in counts} == counts
    assert rloopd("replay", origin.fork, home=target).returncode == 0
