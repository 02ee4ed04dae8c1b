"""python/dln_experiment.py's statistics (the full run itself is the lead's, on a quiet machine)."""
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))

import dln_experiment as ex  # noqa: E402


def test_wilson_mcnemar_balanced_accuracy():
    lo, hi = ex.wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    assert ex.wilson(0, 10)[0] == 0.0 and ex.wilson(10, 10)[1] == 1.0
    labels = [0] * 12 + [1] * 4
    a = [0] * 10 + [1] * 2 + [1] * 4                      # right on 10 + 4
    b = [1] * 10 + [0] * 2 + [1] * 4                      # right on 2 + 4
    m = ex.mcnemar(a, b, labels)
    assert (m["only_a"], m["only_b"]) == (10, 2)
    assert m["p"] == pytest.approx(2 * (1 + 12 + 66) / 2 ** 12)
    assert ex.mcnemar(a, a, labels)["p"] == 1.0
    assert ex.balanced_accuracy(a, labels) == pytest.approx((10 / 12 + 1) / 2)
    assert ex.balanced_accuracy([0] * 16, labels) == 0.5  # the majority class alone is chance
    s = ex.summarize(dict(test_pred=a, test_labels=labels))
    assert s["acc"] == 14 / 16 and s["n"] == 16 and math.isclose(sum(s["pred_counts"].values()), 16)


def test_hand_prompts_cover_every_task():
    assert set(ex.HAND) == set(ex.TASK_ORDER) and all(ex.HAND.values())
