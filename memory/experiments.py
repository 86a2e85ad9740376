"""The experiments table: one row per (run, step, replica), projected from the log into events.db.

`apply(rows, event)` is the pure fold; `ExperimentsTable` keeps the SQLite table and its position in
step with the log, writing both in one transaction, so a crash between them cannot skip or repeat an event.
"""

from __future__ import annotations

import json
from typing import Any

from rloopd.log import Event, EventLog

Key = tuple[str, int, int]  # (run, step, replica)
TYPES = ("run.created", "experiment.started", "experiment.finished", "experiment.decided")
COLUMNS = {
    "run": str, "step": int, "replica": int, "attempt": int, "status": str, "value": float,
    "metrics": str, "accepted": int, "best_after": float, "commit": str, "description": str,
    "category": str, "params": str, "wall_seconds": float,
}


def apply(rows: dict[Key, dict[str, Any]], e: Event, metric_of: dict[str, str]) -> None:
    """Fold one event into `rows` (mutated in place; `metric_of` maps run -> its metric name)."""
    d = e.data
    if e.type == "run.created":
        metric_of[e.stream] = d.get("metric", "val_bpb")
        return
    if e.type not in TYPES:
        return
    key = (e.stream, d["step"], d.get("replica", 0))
    if e.type == "experiment.started":
        rows[key] = {
            "run": e.stream, "step": d["step"], "replica": d.get("replica", 0), "attempt": d.get("attempt", 0),
            "status": "running", "value": None, "metrics": None, "accepted": None, "best_after": None,
            "commit": d["commit"], "description": d.get("description", ""), "category": d.get("category"),
            "params": json.dumps(d.get("params") or {}, sort_keys=True), "wall_seconds": None,
        }
    elif key in rows and e.type == "experiment.finished":
        metrics = d.get("metrics") or {}
        rows[key].update(status=d["status"], value=metrics.get(metric_of.get(e.stream, "val_bpb")),
                         metrics=json.dumps(metrics, sort_keys=True), wall_seconds=d.get("wall_seconds"))
    elif key in rows and e.type == "experiment.decided":
        rows[key].update(accepted=int(d["accepted"]), best_after=d.get("best_after"))


class ExperimentsTable:
    """The `experiments` table in events.db and its position in `projection_positions`."""

    NAME = "experiments"

    def __init__(self, log: EventLog):
        self.log = log
        db = log.db
        if not {"experiments", "projection_positions"} <= set(db.table_names()):
            # one write transaction for both tables: a daemon starting a batch's runs at once has several
            # workers here together, and none may see one table without the other
            ddl = [db.create_table_sql("experiments", COLUMNS, pk=("run", "step", "replica"), if_not_exists=True),
                   db.create_table_sql("projection_positions", {"name": str, "seq": int}, pk="name",
                                       if_not_exists=True)]
            log.conn.execute("BEGIN IMMEDIATE")
            try:
                for sql in ddl:
                    log.conn.execute(sql)
                log.conn.execute("COMMIT")
            except BaseException:
                log.conn.execute("ROLLBACK")
                raise

    def position(self) -> int:
        row = self.log.conn.execute("SELECT seq FROM projection_positions WHERE name = ?", (self.NAME,)).fetchone()
        return row[0] if row else 0

    def catch_up(self) -> int:
        """Fold every event after the stored position; rows and position commit together."""
        conn = self.log.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            after = self.position()
            metric_of = {e.stream: e.data.get("metric", "val_bpb") for e in self.log.read(types=["run.created"])}
            new = list(self.log.read(types=TYPES, after_seq=after))
            keys = {(e.stream, e.data["step"], e.data.get("replica", 0)) for e in new if "step" in e.data}
            rows = {k: r for k in keys if (r := self._load(k)) is not None}
            for e in new:
                apply(rows, e, metric_of)
            cols = list(COLUMNS)
            conn.executemany(
                f"INSERT OR REPLACE INTO experiments ({', '.join(f'[{c}]' for c in cols)}) VALUES ({', '.join('?' * len(cols))})",
                [[r[c] for c in cols] for r in rows.values()])
            last = max((e.seq for e in new), default=after)
            conn.execute("INSERT OR REPLACE INTO projection_positions (name, seq) VALUES (?, ?)", (self.NAME, last))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return len(new)

    def set_position(self, name: str, position: int) -> None:
        """Record how far another projection (e.g. `rundir:<run>`, an n of the run's stream) has got."""
        self.log.conn.execute("INSERT OR REPLACE INTO projection_positions (name, seq) VALUES (?, ?)", (name, position))

    def position_of(self, name: str) -> int | None:
        row = self.log.conn.execute("SELECT seq FROM projection_positions WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def _load(self, key: Key) -> dict[str, Any] | None:
        cur = self.log.conn.execute("SELECT * FROM experiments WHERE run = ? AND step = ? AND replica = ?", key)
        row = cur.fetchone()
        return dict(zip([c[0] for c in cur.description], row, strict=True)) if row else None

    def rows(self, run: str) -> list[dict[str, Any]]:
        cur = self.log.conn.execute("SELECT * FROM experiments WHERE run = ? ORDER BY step, replica", (run,))
        names = [c[0] for c in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def rebuild(events: list[Event]) -> dict[Key, dict[str, Any]]:
    """The table as a pure fold of `events` (for replay and the projection tests)."""
    rows: dict[Key, dict[str, Any]] = {}
    metric_of: dict[str, str] = {}
    for e in events:
        apply(rows, e, metric_of)
    return rows


def results_tsv(rows: list[dict[str, Any]], metric: str) -> str:
    """memory/results.tsv: step, commit, the metric under its own name, status, accepted, description.

    Never the hidden test value: only the lab's own metric column is read from a row.
    """
    return "\t".join(["step", "commit", metric, "status", "accepted", "description"]) + "\n" + results_lines(rows)


def results_lines(rows: list[dict[str, Any]]) -> str:
    """The lines of results.tsv below its header, one per proposal (replica 0), each ending in a newline.

    A row's line depends on that row alone, so the text of rows in step order can be kept and joined
    (fold snapshots keep it, so a fork writes results.tsv without parsing a row).
    """
    lines = []
    for r in rows:
        if r["replica"] != 0:
            continue
        value = "" if r["value"] is None else f"{r['value']:.6f}"
        accepted = {None: "", 1: "yes", 0: "no"}[r["accepted"]]
        desc = " ".join(str(r["description"] or "").split())
        lines.append("\t".join([str(r["step"]), (r["commit"] or "")[:12], value, r["status"], accepted, desc]) + "\n")
    return "".join(lines)
