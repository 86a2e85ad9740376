"""rloopd audit: chains, canonical payloads, blobs and expected heads; any changed byte is named."""

from __future__ import annotations

import json
import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rloopd import events as ev
from rloopd.audit import audit
from rloopd.errors import PayloadInvalid
from rloopd.log import NewEvent, canonical_event, canonical_json, chain_hash

from .conftest import rloopd, sample_payloads


def drop_triggers(conn: sqlite3.Connection) -> None:
    conn.execute("DROP TRIGGER events_no_update")
    conn.execute("DROP TRIGGER events_no_delete")


@pytest.fixture
def filled(home):
    blob = home.blobs.put(b"program text")
    home.log.append("run-1", [NewEvent(t, d) for t, d in sample_payloads(blob).items()])
    home.log.append_one("home", "daemon.started", {"version": "0.1.0"})
    home.log.append_one("run-1", "experiment.started", {"step": 2, "commit": "c", "params": {"LR": 1e-05}})
    assert audit(home.log, home.blobs).ok
    return home


def _mutations(text: str):
    """A changed byte at every position of the text (a different character that keeps it UTF-8)."""
    for i, c in enumerate(text):
        repl = "0" if c != "0" else "1"
        yield i, text[:i] + repl + text[i + 1:]


def test_any_changed_byte_of_any_event_is_named(filled):
    conn = filled.log.conn
    drop_triggers(conn)
    rows = conn.execute("SELECT seq, stream, n, data FROM events").fetchall()
    checked = 0
    for seq, stream, n, data in rows:
        for _i, changed in _mutations(data):
            conn.execute("UPDATE events SET data = ? WHERE seq = ?", (changed, seq))
            report = audit(filled.log, filled.blobs)
            first = report.first()
            assert first is not None and (first.stream, first.n, first.seq) == (stream, n, seq), changed
            checked += 1
        conn.execute("UPDATE events SET data = ? WHERE seq = ?", (data, seq))
    assert checked > 1000 and audit(filled.log, filled.blobs).ok


def test_edit_that_parses_to_the_same_value_is_caught(filled, home_dir):
    conn = filled.log.conn
    seq, n, data = conn.execute("SELECT seq, n, data FROM events WHERE data LIKE '%1e-05%'").fetchone()
    drop_triggers(conn)
    conn.execute("UPDATE events SET data = ? WHERE seq = ?", (data.replace("1e-05", "1E-05"), seq))
    assert json.loads(data) == json.loads(data.replace("1e-05", "1E-05"))
    filled.close()
    proc = rloopd("audit", home=home_dir)
    assert proc.returncode == 1
    assert f"run-1 n={n} seq={seq}" in proc.stderr and "canonical" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("column,value", [("type", "run.resumed"), ("at", "2020-01-01T00:00:00.000000Z"),
                                          ("prev", "f" * 64), ("hash", "e" * 64), ("v", 2)])
def test_edits_of_other_columns_are_caught(filled, column, value):
    conn = filled.log.conn
    drop_triggers(conn)
    seq = conn.execute("SELECT seq FROM events WHERE stream = 'run-1' AND n = 5").fetchone()[0]
    conn.execute(f"UPDATE events SET {column} = ? WHERE seq = ?", (value, seq))
    first = audit(filled.log, filled.blobs).first()
    assert first is not None and first.n in (5, 6)  # a changed hash is caught at the next event's prev


def test_deleted_event_is_a_gap(filled):
    drop_triggers(filled.log.conn)
    filled.log.conn.execute("DELETE FROM events WHERE stream = 'run-1' AND n = 3")
    first = audit(filled.log, filled.blobs).first()
    assert first.n == 4 and "missing" in first.what


def rewrite_stream(conn: sqlite3.Connection, stream: str) -> None:
    """A consistent forgery: change one payload and recompute every hash after it."""
    drop_triggers(conn)
    rows = conn.execute("SELECT seq, n, type, v, at, data FROM events WHERE stream = ? ORDER BY n", (stream,))
    link = ""
    for seq, n, type_, v, at, data in rows.fetchall():
        if type_ == "experiment.finished":
            data = data.replace('"val_bpb":2.5', '"val_bpb":1.5')
        h = chain_hash(link, canonical_event(stream, n, type_, v, at, data))
        conn.execute("UPDATE events SET data = ?, prev = ?, hash = ? WHERE seq = ?", (data, link, h, seq))
        link = h


def test_expect_catches_a_consistent_rewrite(filled, home_dir):
    kept = rloopd("audit", "--json", home=home_dir, check=True)
    heads = {s["stream"]: s["head"] for s in json.loads(kept.stdout)["streams"]}
    rewrite_stream(filled.log.conn, "run-1")
    assert "1.5" in filled.log.conn.execute("SELECT data FROM events WHERE type='experiment.finished'").fetchone()[0]
    assert rloopd("audit", home=home_dir).returncode == 0  # internally consistent ...
    proc = rloopd("audit", "--expect", f"run-1={heads['run-1']}", home=home_dir)
    assert proc.returncode == 1 and "run-1" in proc.stderr and "expected" in proc.stderr  # ... but not what was kept
    assert rloopd("audit", "--expect", f"home={heads['home']}", home=home_dir).returncode == 0


def test_blobs_are_verified(filled, home_dir):
    path = next(p for p in filled.blobs.root.rglob("*") if p.is_file())
    path.write_bytes(b"tampered")
    proc = rloopd("audit", home=home_dir)
    assert proc.returncode == 1 and "corrupt" in proc.stderr, proc.stderr
    path.unlink()
    proc = rloopd("audit", "--json", home=home_dir)
    assert proc.returncode == 1 and "missing" in json.loads(proc.stdout)["problems"][0]["what"]


def test_audit_prints_head_hashes(filled, home_dir):
    proc = rloopd("audit", home=home_dir, check=True)
    head = filled.log.head("run-1")[1]
    assert f"head {head}" in proc.stdout and "ok" in proc.stdout


@pytest.mark.parametrize("batch", [1, 2, 512])
def test_a_payload_its_model_refuses_is_named_in_place(filled, monkeypatch, batch):
    """Payloads are checked a batch at a time; one its model refuses (hashed consistently) is still named at
    its event, before that event's blob problem and after the problems of the events before it."""
    from rloopd import audit as audit_module

    monkeypatch.setattr(audit_module._Payloads, "BATCH", batch)
    conn = filled.log.conn
    drop_triggers(conn)
    rows = conn.execute("SELECT seq, n, type, v, at, data FROM events WHERE stream = 'run-1' ORDER BY n").fetchall()
    link = ""
    for seq, n, type_, v, at, data in rows:
        if type_ in ("session.started", "agent.acted"):  # a blob that is not there; for the act, a bad kind too
            payload = json.loads(data)
            if type_ == "session.started":
                payload["program_blob"] = "d" * 64
            else:
                payload.update(detail_blob="e" * 64, kind="dance")
            data = canonical_json(payload)
        h = chain_hash(link, canonical_event("run-1", n, type_, v, at, data))
        conn.execute("UPDATE events SET data = ?, prev = ?, hash = ? WHERE seq = ?", (data, link, h, seq))
        link = h
    acted = conn.execute("SELECT n FROM events WHERE stream = 'run-1' AND type = 'agent.acted'").fetchone()[0]
    problems = [(p.n, p.what.split()[0]) for p in audit(filled.log, filled.blobs).problems]
    assert problems == [(acted - 2, "blob"), (acted, "invalid"), (acted, "blob")], problems


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=5)


@settings(max_examples=300, deadline=None)
@given(type_=st.sampled_from(sorted(sample_payloads())), change=st.sampled_from(["drop", "add", "set"]),
       index=st.integers(0, 50), value=JSON)
def test_batched_payload_checks_agree_with_the_models(type_, change, index, value):
    """Audit checks payloads a batch at a time through `all_valid`; it accepts exactly what the models do."""
    payload = dict(sample_payloads()[type_])
    keys = sorted(ev.TYPES[type_][1].model_fields)
    key = keys[index % len(keys)]
    if change == "drop":
        payload.pop(key, None)
    else:
        payload["unknown" if change == "add" else key] = value
    try:
        ev.decode(type_, ev.current_version(type_), payload)
        valid = True
    except PayloadInvalid:
        valid = False
    assert ev.all_valid(type_, [payload]) == valid
    assert ev.all_valid(type_, [sample_payloads()[type_], payload, sample_payloads()[type_]]) == valid
