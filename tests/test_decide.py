"""The accept/reject rule: pure, in the metric's direction, with margins."""

from __future__ import annotations

import pytest

from rloopd.decide import decide, parse_rule
from rloopd.errors import LabConfigError


def test_first_valid_result_sets_the_best():
    d = decide(None, "ok", 3.0, "minimize")
    assert d.accepted and d.best_after == 3.0


@pytest.mark.parametrize("status", ["crashed", "oom", "timeout", "invalid", "interrupted"])
def test_failed_statuses_never_accepted(status):
    d = decide(3.0, status, 1.0, "minimize")
    assert not d.accepted and d.best_after == 3.0 and status in d.reason


def test_direction_and_margin():
    assert decide(3.0, "ok", 2.9, "minimize").accepted
    assert not decide(3.0, "ok", 3.0, "minimize").accepted
    assert not decide(3.0, "ok", 3.1, "minimize").accepted
    assert decide(0.5, "ok", 0.6, "maximize").accepted
    assert not decide(0.5, "ok", 0.4, "maximize").accepted
    assert not decide(3.0, "ok", 2.97, "minimize", "margin:0.05").accepted
    assert decide(3.0, "ok", 2.9, "minimize", "margin:0.05").accepted
    assert not decide(3.0, "ok", float("nan"), "minimize").accepted


@pytest.mark.parametrize("rule", ["margin:-1", "margin:x", "best", "margin:inf"])
def test_bad_rules(rule):
    with pytest.raises(LabConfigError, match="acceptance rule"):
        parse_rule(rule)
