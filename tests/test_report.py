"""`rloopd report`: figures, summary.json and the HTML page from the log alone; its numbers against a hand
computation from the events; bad input; and the page in headless Chromium with no request leaving."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest
from scipy.stats import mannwhitneyu

from rloopd.fork import fork_run
from rloopd.home import Home
from rloopd.log import NewEvent
from rloopd.report import FILES, ReportInputError, build_report, write_report

from .conftest import need_tool, rloopd
from .daemon_helpers import Served

INSTANT = Path(__file__).parent / "labs" / "instant"
QUESTION = "Does drawing every constant at once beat changing one?"
CONDITIONS = {"random": "random", "all": "random:all"}  # condition -> agent
REPEATS, EXPERIMENTS = 2, 3


def quantile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), written out."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = int(pos)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (pos - lo)


@pytest.fixture(scope="module")
def batch_home(tmp_path_factory) -> dict:
    """A batch of 2 conditions x 2 repeats on the instant lab, run by `rloopd batch run` through a daemon,
    and its report by the CLI."""
    tmp = tmp_path_factory.mktemp("report")
    lab = tmp / "lab"
    shutil.copytree(INSTANT, lab)
    home_dir = tmp / "home"
    conditions = "".join(f'[[conditions]]\nname = "{c}"\nagent = "{a}"\n' for c, a in CONDITIONS.items())
    (tmp / "batch.toml").write_text(
        f'question = "{QUESTION}"\nlab = "{lab}"\nrepeats = {REPEATS}\nexperiments = {EXPERIMENTS}\n'
        f'sandbox = "none"\n[criteria]\nbaseline = "random"\n{conditions}')
    served = Served(home_dir, "--cpu-slots", "2").start()
    try:
        info = json.loads(rloopd("batch", "run", str(tmp / "batch.toml"), "--json", home=home_dir, timeout=180,
                                 check=True).stdout)
    finally:
        served.close()
    batch = info["batch"]
    with Home.open(home_dir) as home:
        made = {e.data["run"]: e.data["condition"] for e in home.log.read(f"batch:{batch}", types=["batch.run-added"])}
    out = tmp / "out"
    proc = rloopd("report", "--batch", batch, "-o", str(out), "--json", home=home_dir, check=True)
    return {"home": home_dir, "runs": made, "out": out, "printed": json.loads(proc.stdout), "tmp": tmp,
            "batch": batch}


def by_hand(home_dir: Path, run: str) -> dict:
    """DESIGN section 3's numbers of one run, read straight from its events."""
    with Home.open(home_dir, create=False) as home:
        events = list(home.log.read(run))
    experiments = [e.data for e in events if e.type == "experiment.finished" and e.data["step"] >= 1
                   and e.data.get("replica", 0) == 0 and e.data["status"] != "interrupted"]
    decided = [e.data for e in events if e.type == "experiment.decided"]
    accepted = [d for d in decided if d["accepted"] and d["step"] >= 1]
    best = [d["best_after"] for d in decided if d["accepted"]][-1]
    category = {e.data["step"]: e.data["category"] for e in events if e.type == "experiment.started"}
    return {"experiments": len(experiments), "valid": sum(f["status"] == "ok" for f in experiments),
            "accepted_pct": 100 * len(accepted) / len(experiments), "final_best": best,
            "improved": {category[d["step"]] for d in accepted},
            "gains": [(category[d["step"]], d["best_before"] - d["best_after"]) for d in accepted]}


def test_report_files_and_numbers_match_the_events(batch_home):
    out, summary = batch_home["out"], json.loads((batch_home["out"] / "summary.json").read_text())
    for name in FILES:
        assert (out / name).stat().st_size > 0, name
    for name in ("curves.png", "runs.png", "ideas.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert batch_home["printed"]["summary"] == summary
    assert summary["question"] == QUESTION and summary["baseline"] == "random" and summary["batch"] == batch_home["batch"]
    assert list(summary["conditions"]) == ["random", "all"]  # the baseline first
    hand = {run: by_hand(batch_home["home"], run) for run in batch_home["runs"]}
    for condition in CONDITIONS:
        mine = [run for run, c in batch_home["runs"].items() if c == condition]
        got = summary["conditions"][condition]
        assert got["runs"] == mine
        finals = [hand[r]["final_best"] for r in mine]
        assert got["median_final_best"] == pytest.approx(statistics.median(finals))
        assert got["iqr"] == pytest.approx(quantile(finals, 0.75) - quantile(finals, 0.25))
        best = min(mine, key=lambda r: hand[r]["final_best"])
        assert got["best_run"]["run"] == best and got["best_run"]["value"] == hand[best]["final_best"]
        assert got["accepted_pct"]["values"] == pytest.approx([hand[r]["accepted_pct"] for r in mine])
        assert got["accepted_pct"]["median"] == pytest.approx(statistics.median(hand[r]["accepted_pct"] for r in mine))
        assert got["valid_experiments"]["values"] == [hand[r]["valid"] for r in mine]
        assert got["restarts"]["values"] == [0] * REPEATS  # built-in agents open no sessions
        assert got["theoretical_max"] is None  # a step budget
        for cat, idea in got["ideas"].items():
            improved = [r for r in mine if cat in hand[r]["improved"]]
            gains = [g for r in mine for c, g in hand[r]["gains"] if c == cat]
            assert idea["improved_runs"] == len(improved) and idea["share"] == pytest.approx(len(improved) / REPEATS)
            assert idea["mean_improvement"] == (pytest.approx(sum(gains) / len(gains)) if gains else None)
    [cmp] = summary["comparisons"]
    base = [hand[r]["final_best"] for r, c in batch_home["runs"].items() if c == "random"]
    other = [hand[r]["final_best"] for r, c in batch_home["runs"].items() if c == "all"]
    assert cmp["condition"] == "all" and cmp["baseline"] == "random"
    assert cmp["difference"] == pytest.approx(statistics.median(other) - statistics.median(base))
    test = mannwhitneyu(other, base, alternative="two-sided")
    assert cmp["u"] == pytest.approx(test.statistic) and cmp["p_value"] == pytest.approx(test.pvalue)
    assert cmp["ci"][0] <= cmp["ci"][1]


def test_report_is_deterministic_and_the_page_is_self_contained(batch_home):
    again = batch_home["tmp"] / "again"
    with Home.open(batch_home["home"], create=False) as home:
        write_report(home.log, again, batch=batch_home["batch"])
    assert (again / "summary.json").read_text() == (batch_home["out"] / "summary.json").read_text()
    for name in ("curves.png", "runs.png", "ideas.png"):
        assert (again / name).read_bytes() == (batch_home["out"] / name).read_bytes(), name
    page = (batch_home["out"] / "report.html").read_text()
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page and "url(" not in page
    assert page.count('<img src="data:image/png;base64,') == 3
    assert QUESTION in page.replace("&#x27;", "'")
    for run in batch_home["runs"]:
        assert run in page


def test_fork_lineage_is_on_the_page(batch_home):
    parent = next(iter(batch_home["runs"]))
    with Home.open(batch_home["home"], create=False) as home:
        fork = fork_run(home, parent, 2, name="forked-at-2", experiments=0)
        report = build_report(home.log, runs=[fork, parent])
        out = batch_home["tmp"] / "fork"
        write_report(home.log, out, runs=[fork, parent])
    row = next(r for r in report.summary["runs"] if r["run"] == fork)
    name = row["lineage"][0]["name"]
    assert row["lineage"] == [{"run": parent, "step": 2, "n": row["lineage"][0]["n"], "name": name}]
    assert name.endswith(parent[:6])  # the parent's own name (a batch's runs are named lab-<id>)
    assert row["experiments"] == 2  # the parent's prefix counts, as `rloopd status` counts it
    page = (out / "report.html").read_text()
    assert f"{name} ({parent}) @ step 2 → forked-at-2" in page
    with Home.open(batch_home["home"], create=False) as home:  # the fork inherits the batch field; no repeat
        assert fork not in build_report(home.log, batch=batch_home["batch"]).summary["conditions"]["random"]["runs"]


# --- hand-written logs: the definitions, exactly ---------------------------------------------------


def write_run(home: Home, run: str, steps: list[tuple[str, dict]], **created) -> None:
    home.log.append(run, [NewEvent("run.created", {"name": run, "lab": "/lab", **created}),
                          *(NewEvent(t, d) for t, d in steps)], expected_n=0)


def experiment(step: int, status: str, value: float | None, category: str | None = None, *, attempt: int = 0,
               replica: int = 0, metric: str = "val_bpb") -> list[tuple[str, dict]]:
    return [("experiment.started", {"step": step, "replica": replica, "attempt": attempt, "commit": "c",
                                    "category": category}),
            ("experiment.finished", {"step": step, "replica": replica, "attempt": attempt, "status": status,
                                     "metrics": {} if value is None else {metric: value}})]


def decided(step: int, before: float | None, after: float | None, accepted: bool) -> tuple[str, dict]:
    return ("experiment.decided", {"step": step, "accepted": accepted, "best_before": before, "best_after": after})


def session(n: int, start: bool, reason: str = "agent-exit") -> tuple[str, dict]:
    return ("session.started", {"session": n, "agent": "cmd:x"}) if start else \
        ("session.ended", {"session": n, "reason": reason})


def test_definitions_on_a_hand_written_log(home):
    write_run(home, "agent-run", [
        session(1, True), *experiment(0, "ok", 2.0), decided(0, None, 2.0, True),
        *experiment(1, "interrupted", None, "depth"),  # not an experiment: started again as attempt 1
        session(1, False, "agent-exit"), session(2, True),  # restart 1
        *experiment(1, "ok", 1.8, "depth", attempt=1), decided(1, 2.0, 1.8, True),
        *experiment(2, "crashed", None, "learning rate"), decided(2, 1.8, 1.8, False),  # counts, not valid
        *experiment(3, "ok", 1.7, "depth"), *experiment(3, "ok", 1.75, "depth", replica=1),  # a replica: not counted
        decided(3, 1.8, 1.7, True),
        session(2, False, "window"), session(3, True),  # the window closed: not a restart
        *experiment(4, "ok", 1.9), decided(4, 1.7, 1.7, False),
        session(3, False, "agent-exit"), session(4, True), session(4, False, "timeout"),  # restart 2
    ], budget="60", window_seconds=3600.0, agent="cmd:x")
    write_run(home, "random-run", [*experiment(0, "ok", 2.1), decided(0, None, 2.1, True),
                                   *experiment(1, "ok", 2.0, "width"), decided(1, 2.1, 2.0, True)],
              budget="steps:10", window_seconds=3600.0)
    report = build_report(home.log, groups={"agent": ["agent-run"], "random": ["random-run"]}, question="q?")
    a, r = (report.conditions[c][0] for c in ("agent", "random"))
    assert (a.experiments, a.valid, a.accepted, a.accepted_pct, a.restarts) == (4, 3, 2, 50.0, 2)
    assert (a.final_best, a.best_step, a.theoretical_max) == (1.7, 3, 60)  # floor(3600 / 60)
    assert a.curve == [2.0, 1.8, 1.8, 1.7, 1.7]
    assert a.categories == {"depth": {"tried": 2, "improvements": [pytest.approx(0.2), pytest.approx(0.1)]},
                            "learning rate": {"tried": 1, "improvements": []},
                            "uncategorized": {"tried": 1, "improvements": []}}
    assert (r.theoretical_max, r.accepted_pct, r.restarts) == (None, 100.0, 0)  # no maximum for a step budget
    s = report.summary
    assert s["baseline"] == "random" and list(s["conditions"]) == ["random", "agent"]
    assert s["conditions"]["agent"]["theoretical_max"] == 60 and s["conditions"]["random"]["theoretical_max"] is None
    assert s["conditions"]["agent"]["ideas"]["depth"] == {
        "tried_runs": 1, "improved_runs": 1, "share": 1.0, "mean_improvement": pytest.approx(0.15), "accepted": 2}
    [cmp] = s["comparisons"]
    assert cmp["difference"] == pytest.approx(-0.3) and cmp["ci"] == [pytest.approx(-0.3)] * 2
    assert (cmp["u"], cmp["p_value"]) == (0.0, 1.0)


def test_a_maximized_metric_reads_the_other_way(home):
    for run, values in (("up-1", [0.5, 0.7]), ("up-2", [0.5, 0.6])):
        steps = [*experiment(0, "ok", values[0], metric="acc"), decided(0, None, values[0], True),
                 *experiment(1, "ok", values[1], "width", metric="acc"), decided(1, values[0], values[1], True)]
        write_run(home, run, steps, metric="acc", direction="maximize", budget="steps:5")
    report = build_report(home.log, runs=["up-1", "up-2"])
    c = report.summary["conditions"]["random"]
    assert c["best_run"]["run"] == "up-1" and c["ideas"]["width"]["mean_improvement"] == pytest.approx(0.15)


def test_bad_input_names_the_argument_and_writes_nothing(home, tmp_path):
    write_run(home, "ok-run", [*experiment(0, "ok", 2.0), decided(0, None, 2.0, True),
                               *experiment(1, "ok", 1.9, "depth"), decided(1, 2.0, 1.9, True)])
    write_run(home, "baseline-only", [*experiment(0, "ok", 2.0), decided(0, None, 2.0, True),
                                      *experiment(1, "interrupted", None)])
    write_run(home, "other-metric", [*experiment(0, "ok", 3.0, metric="loss"), decided(0, None, 3.0, True),
                                     *experiment(1, "ok", 2.9, metric="loss"), decided(1, 3.0, 2.9, True)],
              metric="loss")
    write_run(home, "queued", [], batch="bq", condition="random")  # a batch run that has not started
    out = tmp_path / "out"
    (tmp_path / "a-file").write_text("")
    cases = [({"runs": ["nope"]}, "RUN 'nope'"),
             ({"batch": "nope"}, "--batch nope: no batch"),
             ({"batch": "bq"}, "--batch bq: none of its runs has a finished experiment yet"),
             ({"runs": ["ok-run", "baseline-only"]}, "RUN 'baseline-only': run baseline-only (baseline-only) has no finished"),
             ({"runs": ["ok-run", "other-metric"]}, "cannot compare val_bpb (minimize) of run ok-run (condition "
                                                    "random) with loss (minimize) of run other-metric"),
             ({"runs": ["ok-run"], "baseline": "codex"}, "--baseline codex"),
             ({}, "RUN: name runs, or --batch B")]
    for kw, message in cases:
        with pytest.raises(ReportInputError) as e:
            write_report(home.log, out, **kw)
        assert str(e.value).startswith(message), (kw, str(e.value))
        assert not out.exists()
    with pytest.raises(ReportInputError, match="^-o .*a-file: exists and is not a directory"):
        write_report(home.log, tmp_path / "a-file", runs=["ok-run"])
    home.close()
    proc = rloopd("report", "ok-run", "other-metric", "-o", str(out), home=home.path)
    assert proc.returncode == 2 and not out.exists()
    assert proc.stderr.strip().splitlines() == [
        "rloopd: error: cannot compare val_bpb (minimize) of run ok-run (condition random) with loss (minimize) of "
        "run other-metric (condition random): one report compares one metric in one direction"]
    assert proc.stdout == ""


# --- memory policies, search spaces, and labs that cannot be compared ------------------------------

LR_SPACE = '\n[spaces.lr]\neditable = ["workspace/train.py"]\ndescription = "the instant lab\'s train.py"\n'
MLP = Path(__file__).parent / "labs" / "mlp"


def lab_with_spaces(tmp_path: Path) -> Path:
    lab = tmp_path / "lab"
    shutil.copytree(INSTANT, lab)
    with open(lab / "rloop.toml", "a") as f:
        f.write(LR_SPACE)
    return lab


def test_a_batch_names_each_conditions_memory_policy_and_search_space(home, tmp_path):
    from rloopd.batch import create_batch
    from rloopd.loop import Loop

    lab = lab_with_spaces(tmp_path)
    (tmp_path / "batch.toml").write_text(
        f'question = "Do notes help?"\nlab = "{lab}"\nrepeats = 2\nexperiments = 2\nsandbox = "none"\n'
        '[criteria]\nbaseline = "notes"\n[[conditions]]\nname = "notes"\nagent = "random"\n'
        '[[conditions]]\nname = "blank"\nagent = "random"\nmemory = "none"\n'
        '[[conditions]]\nname = "lr-only"\nagent = "random"\nspace = "lr"\n')
    batch, made = create_batch(home, tmp_path / "batch.toml")
    for run in made:
        Loop(home, run).run()
    s = build_report(home.log, batch=batch).summary
    got = {c: {k: v[k] for k in ("agent", "program", "memory_policy", "search_space")}
           for c, v in s["conditions"].items()}
    assert got == {"notes": {"agent": "random", "program": "lab's program.md", "memory_policy": "notes",
                             "search_space": "workspace/*.py"},
                   "blank": {"agent": "random", "program": "lab's program.md", "memory_policy": "none",
                             "search_space": "workspace/*.py"},
                   "lr-only": {"agent": "random", "program": "lab's program.md", "memory_policy": "notes",
                               "search_space": "lr"}}
    rows = {r["condition"]: r for r in s["runs"]}
    assert rows["lr-only"]["search_space_spec"] == {"preset": "lr", "editable": ["workspace/train.py"],
                                                    "regions": False, "description": "the instant lab's train.py"}
    assert rows["notes"]["search_space_spec"]["preset"] is None
    out = tmp_path / "out"
    write_report(home.log, out, batch=batch)
    assert json.loads((out / "summary.json").read_text())["conditions"]["blank"]["memory_policy"] == "none"
    page = (out / "report.html").read_text()
    assert "<th>memory</th><th>search space</th>" in page
    assert "<td>blank</td><td>random</td><td>lab&#x27;s program.md</td><td>none</td><td>workspace/*.py</td>" in page
    assert "<td>lr-only</td><td>random</td><td>lab&#x27;s program.md</td><td>notes</td><td>lr</td>" in page


def test_runs_without_a_batch_are_grouped_by_agent_program_memory_and_space(home, tmp_path):
    from rloopd import runs
    from rloopd.loop import Loop

    lab = lab_with_spaces(tmp_path)
    other = tmp_path / "other.md"
    other.write_text("# another program\n")
    made = {}
    for key, kw in {"plain": {}, "plain-2": {}, "blank": {"memory": "none"}, "lr": {"space": "lr"},
                    "all": {"agent": "random:all"}, "told": {"program": other}}.items():
        made[key] = runs.create_run(home, lab, agent=kw.pop("agent", "random"), experiments=1, budget=None, seed=0,
                                    name=key, sandbox="none", **kw)
        Loop(home, made[key]).run()
    report = build_report(home.log, runs=list(made.values()))
    names = {c: [r.name for r in rs] for c, rs in report.conditions.items()}
    base = "program lab's program.md · memory notes · space workspace/*.py"
    assert names == {f"random · {base}": ["plain", "plain-2"],
                     "random · program lab's program.md · memory none · space workspace/*.py": ["blank"],
                     "random · program lab's program.md · memory notes · space lr": ["lr"],
                     f"random:all · {base}": ["all"],
                     "random · program other.md · memory notes · space workspace/*.py": ["told"]}
    c = report.summary["conditions"]["random · program lab's program.md · memory none · space workspace/*.py"]
    assert (c["agent"], c["program"], c["memory_policy"], c["search_space"]) == (
        "random", "lab's program.md", "none", "workspace/*.py")
    # only what differs among the runs reported names a condition
    report = build_report(home.log, runs=[made["plain"], made["blank"]])
    assert list(report.conditions) == ["random · memory notes", "random · memory none"]
    assert list(build_report(home.log, runs=[made["plain"], made["all"]]).conditions) == ["random", "random:all"]
    home.close()
    proc = rloopd("report", "plain", "blank", "lr", "-o", str(tmp_path / "out"), home=home.path, check=True)
    for word in ("memory", "search space", "random · memory none · space workspace/*.py", "space lr"):
        assert word in proc.stdout, word


def test_old_and_new_records_of_a_space_and_a_memory_policy_group_together(home):
    old = {"search_space": {"editable": ["workspace/*.py"]}}  # before presets: no preset, no regions
    new = {"search_space": {"preset": None, "editable": ["workspace/*.py"], "regions": False},
           "memory_policy": "notes"}
    steps = [*experiment(0, "ok", 2.0), decided(0, None, 2.0, True), *experiment(1, "ok", 1.9), decided(1, 2.0, 1.9, True)]
    write_run(home, "old", steps, **old)
    write_run(home, "new", steps, **new)
    write_run(home, "marked", steps, search_space={"preset": None, "editable": ["workspace/train.py"],
                                                   "regions": ["hparams"]}, memory_policy="from:old@1")
    report = build_report(home.log, runs=["old", "new", "marked"])
    assert {c: [r.run for r in rs] for c, rs in report.conditions.items()} == {
        "random · memory notes · space workspace/*.py": ["old", "new"],
        "random · memory from:old@1 · space workspace/train.py (regions hparams)": ["marked"]}


def test_runs_of_two_labs_with_different_metrics_are_refused(home, tmp_path):
    from rloopd import runs
    from rloopd.loop import Loop

    instant = runs.create_run(home, INSTANT, agent="random", experiments=1, budget=None, seed=0, name="bytes",
                              sandbox="none")
    mlp = runs.create_run(home, MLP, agent="random", experiments=0, budget="steps:20", seed=0, name="mlp",
                          sandbox="none")
    for run in (instant, mlp):
        Loop(home, run).run()
    assert next(home.log.read(mlp, types=["experiment.finished"])).data["status"] == "ok"
    message = (f"cannot compare val_bpb (minimize) of run {instant} (bytes, condition random) with val_accuracy "
               f"(maximize) of run {mlp} (mlp, condition random): one report compares one metric in one direction")
    out = tmp_path / "out"
    with pytest.raises(ReportInputError) as e:
        write_report(home.log, out, runs=[instant, mlp])
    assert str(e.value) == message and not out.exists()
    with pytest.raises(ReportInputError, match=f"^cannot compare val_bpb .* of run {instant} \\(bytes, condition "
                                               f"a\\) with val_accuracy \\(maximize\\) of run {mlp} \\(mlp, condition b\\)"):
        build_report(home.log, groups={"a": [instant], "b": [mlp]})
    home.close()
    proc = rloopd("report", "bytes", "mlp", "-o", str(out), home=home.path)
    assert proc.returncode == 2 and not out.exists() and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"rloopd: error: {message}"]


# --- the page in a browser -------------------------------------------------------------------------

PROBE = """<!DOCTYPE html><html><body><script>
const f = document.createElement("iframe");
f.onload = () => {
  const imgs = Array.from(f.contentDocument.images);
  document.body.dataset.images = JSON.stringify(imgs.map(i => [i.dataset.name, i.complete, i.naturalWidth]));
};
f.src = "report.html";
document.body.appendChild(f);
</script></body></html>"""
CONTROL = '<!DOCTYPE html><html><body><img src="http://example.invalid/x.png"></body></html>'


def chromium(exe: str, page: Path, tmp: Path) -> tuple[str, list[str]]:
    """Open `page` headless, offline; its DOM after load, and the URLs of requests the page made (from the
    net log; the browser's own background requests, initiated by no origin, are not the page's)."""
    netlog = tmp / f"{page.stem}.netlog.json"
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--allow-file-access-from-files",  # the probe reads the report's DOM through an iframe
           "--disable-background-networking", "--disable-component-update",
           "--proxy-server=http://127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",  # should any try
           f"--user-data-dir={tmp / ('profile-' + page.stem)}", f"--log-net-log={netlog}",
           "--dump-dom", page.as_uri()]
    if shutil.which("unshare") and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
        cmd = ["unshare", "-n", *cmd]  # a network namespace with no interface but loopback: nothing can leave
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = json.loads(netlog.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    started = [e.get("params", {}) for e in log["events"] if e["type"] == start]
    urls = [p["url"] for p in started if "url" in p and p.get("initiator") != "not an origin"
            and not p["url"].startswith(("file:", "data:"))]
    return proc.stdout, urls


def test_the_page_renders_in_chromium_with_no_request_leaving(batch_home, tmp_path):
    exe = need_tool("chromium")
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(batch_home["out"] / "report.html", site / "report.html")
    (site / "probe.html").write_text(PROBE)
    (site / "control.html").write_text(CONTROL)
    dom, requests = chromium(exe, site / "probe.html", tmp_path)
    assert 'data-images="' in dom, dom[-2000:]
    images = json.loads(dom.split('data-images="', 1)[1].split('"', 1)[0].replace("&quot;", '"'))
    assert [name for name, _, _ in images] == ["curves.png", "runs.png", "ideas.png"]
    assert all(complete and width > 0 for _, complete, width in images), images
    assert requests == []
    # the net log does show a page's request: the check above can fail
    _, requests = chromium(exe, site / "control.html", tmp_path)
    assert requests == ["http://example.invalid/x.png"]
