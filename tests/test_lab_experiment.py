"""The lab's entry point end to end: real judge, real children, each status from a small train.py."""

from __future__ import annotations

import json
import math

import pytest

from tests.labfixtures import harness as h

SECRETS = {"data_seed": 4242, "test_secret": "not-the-real-one"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One data cache for the module: the splits are generated once, then read."""
    return tmp_path_factory.mktemp("labcache")


def run_fixture(tmp_path, cache, name, *extra, **kw):
    ws = h.workspace(tmp_path, h.fixture(name))
    return h.run(ws, tmp_path, cache, *extra, **kw)


def test_reference_train_py_learns_and_is_deterministic(tmp_path, cache):
    """The reference train.py (tiny constants) runs ok; the same seed and steps:N give identical results."""
    ws = h.workspace(tmp_path, h.tiny_train_py())
    first, log, proc = h.run(ws, tmp_path / "a", cache, budget="steps:20", seed=3, secrets=SECRETS)
    assert proc.returncode == 0, proc.stderr
    assert first["status"] == "ok", (first, log[-2000:])
    assert first["sealed"] is True
    assert first["train_steps"] == 20 and first["train_tokens"] == 20 * 8 * 32
    assert first["oracle_bpb"] + 0.3 < first["val_bpb"] < 7.5
    assert first["test_bpb"] > first["oracle_test_bpb"]
    assert first["probes"] == 8 and first["context_len"] == 32 and first["params"] > 0
    assert first["peak_memory_mb"] > 10 and first["train_seconds"] > 0
    second, _, _ = h.run(ws, tmp_path / "b", cache, budget="steps:20", seed=3, secrets=SECRETS)
    timing = {"train_seconds", "eval_seconds", "wall_seconds", "tokens_per_second", "peak_memory_mb"}
    assert {k: v for k, v in first.items() if k not in timing} == {k: v for k, v in second.items() if k not in timing}
    other, _, _ = h.run(ws, tmp_path / "c", cache, budget="steps:20", seed=4, secrets=SECRETS)
    assert other["val_bpb"] != first["val_bpb"]  # the seed matters (init and batch order)


def test_oracle_predictor_scores_the_floor(tmp_path, cache):
    source = str(h.ROOT / "frozen" / "private" / "source.py")
    ws = h.workspace(tmp_path, h.fixture("oracle.py", SOURCE=source, DATA_SEED=str(SECRETS["data_seed"])))
    result, log, _ = h.run(ws, tmp_path, cache, budget="steps:1", secrets=SECRETS)
    assert result["status"] == "ok", (result, log[-3000:])
    assert result["val_bpb"] == pytest.approx(result["oracle_bpb"], abs=1e-4)
    assert result["test_bpb"] == pytest.approx(result["oracle_test_bpb"], abs=1e-4)
    assert 0.5 < result["oracle_bpb"] < 3


def test_uniform_predictor_scores_eight_bits(tmp_path, cache):
    result, log, _ = run_fixture(tmp_path, cache, "uniform.py", budget="steps:1")
    assert result["status"] == "ok", (result, log[-2000:])
    assert result["val_bpb"] == pytest.approx(8.0, abs=1e-5)
    assert result["test_bpb"] == pytest.approx(8.0, abs=1e-5)
    assert result["sealed"] is False  # no secrets given: the public defaults


@pytest.mark.parametrize("name, status, why", [
    ("raises.py", "crashed", "train: exited with 1"),
    ("nan.py", "invalid", "NaN"),
    ("wrong_shape.py", "invalid", "shape"),
    ("no_context.py", "invalid", "malformed"),
    ("lookahead.py", "invalid", "causality probe failed"),
    ("lookahead_memo.py", "invalid", "causality probe failed"),
])
def test_bad_models_end_in_their_status(tmp_path, cache, name, status, why):
    result, log, proc = run_fixture(tmp_path, cache, name)
    assert proc.returncode == 0, proc.stderr
    assert result["status"] == status, (result, log[-2000:])
    assert why in result["reason"]
    assert result["val_bpb"] is None and result["test_bpb"] is None


def test_ignoring_the_clock_is_killed_at_the_hard_timeout(tmp_path, cache):
    result, _, _ = run_fixture(tmp_path, cache, "ignores_clock.py", budget="steps:2", timeout=6)
    assert result["status"] == "timeout"
    assert result["val_bpb"] is None
    assert 6 <= result["wall_seconds"] < 40


def test_too_much_memory_is_oom(tmp_path, cache):
    result, log, _ = run_fixture(tmp_path, cache, "greedy.py", "--memory-limit", "2500")
    assert result["status"] == "oom", (result, log[-2000:])
    assert result["val_bpb"] is None


def test_forged_results_and_monkeypatched_torch_change_nothing(tmp_path, cache):
    """A planted result file, fake printed metrics and a patched torch: the judge reports real numbers."""
    honest, _, _ = run_fixture(tmp_path / "honest", cache, "bigram.py", budget="steps:5")
    forged, log, _ = run_fixture(tmp_path / "forged", cache, "forger.py", budget="steps:5")
    assert "planted a fake result" in log and "val_bpb: 0.0010" in log  # it really tried
    assert forged["status"] == "ok"
    assert forged["val_bpb"] == pytest.approx(honest["val_bpb"], abs=1e-6)  # the same bigram, the same score
    assert 4 < forged["val_bpb"] < 8.5
    on_disk = json.loads((tmp_path / "forged" / "out" / "result.json").read_text())
    assert on_disk == forged and on_disk["val_bpb"] != 0.001


def test_bad_arguments_exit_2_without_a_result(tmp_path, cache):
    ws = h.workspace(tmp_path, h.fixture("bigram.py"))
    result, _, proc = h.run(ws, tmp_path, cache, budget="fast")
    assert proc.returncode == 2 and result is None
    (tmp_path / "bad.json").write_text("{}")
    result, _, proc = h.run(ws, tmp_path, cache, "--secrets-file", str(tmp_path / "bad.json"))
    assert proc.returncode == 2 and result is None


@pytest.mark.slow
def test_default_train_py_learns_in_12_seconds(tmp_path):
    """The reference train.py at its defaults, the default budget and source: clearly learns, above the floor."""
    ws = h.workspace(tmp_path, (h.ROOT / "workspace" / "train.py").read_text())
    result, log, _ = h.run(ws, tmp_path, tmp_path / "cache", budget="12", source="synthetic",
                           secrets=SECRETS, wall=240)
    assert result["status"] == "ok", (result, log[-2000:])
    assert result["val_bpb"] < 4.0, result
    assert result["val_bpb"] > result["oracle_bpb"] + 0.3
    # the budget is kept; the step count depends on the machine and its load (~130 alone on 2 cores, 25 while
    # another suite ran beside it), so it only has to show that training ran many steps, not one
    assert 11.5 < result["train_seconds"] < 14 and result["train_steps"] > 10
    assert math.isfinite(result["tokens_per_second"]) and result["mfu"] is None


def test_mfu_keeps_small_models_above_zero_and_knows_the_cards(monkeypatch):
    # A tiny model on an H100 sits near 1e-6 MFU; rounding to fixed decimals reported 0.0 (seen on an H100).
    import importlib.util
    monkeypatch.syspath_prepend(str(h.ROOT / "frozen"))
    spec = importlib.util.spec_from_file_location("lab_experiment_under_test", h.ROOT / "frozen" / "experiment.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    tiny = mod.mfu("NVIDIA H100 80GB HBM3", 25_792, 3433.2)
    assert 0 < tiny < 1e-5
    assert mod.mfu("NVIDIA H100 80GB HBM3", 4_987_392, 2_847_029.0) == pytest.approx(0.0861, rel=1e-3)
    assert mod.mfu("cpu", 25_792, 3433.2) is None and mod.mfu("NVIDIA A100-SXM4-40GB", None, 1.0) is None


def test_a_warm_start_loads_the_offered_checkpoint_and_says_so(tmp_path, cache):
    """--warm-start: train(ctx) may load the checkpoint (ctx.load_checkpoint()); the result says whether it
    did, and a model that starts from a trained one ends better than a cold start with the same steps."""
    from rloopd.lab import set_constants

    ws = h.workspace(tmp_path, h.tiny_train_py())
    model = tmp_path / "first.pt"
    cold, log, proc = h.run(ws, tmp_path / "a", cache, "--save-model", str(model), budget="steps:30", seed=1)
    assert cold["status"] == "ok" and cold["warm_started"] is None and model.is_file(), log[-2000:]
    warm_ws = h.workspace(tmp_path, set_constants(h.tiny_train_py(), {"WARM_START": True}), "warm")
    warm, log, _ = h.run(warm_ws, tmp_path / "c", cache, "--warm-start", str(model), budget="steps:30", seed=2)
    assert warm["status"] == "ok" and warm["warm_started"] is True, log[-2000:]
    assert warm["val_bpb"] < cold["val_bpb"] - 0.05  # 60 steps of training in all against 30
    missing, _, proc = h.run(ws, tmp_path / "d", cache, "--warm-start", str(tmp_path / "nope.pt"))
    assert missing is None and proc.returncode == 2 and "--warm-start" in proc.stderr
