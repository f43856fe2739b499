"""``python -m benchmarks.gradient_pass_memory --groups`` on a tiny model:
each budget's groups and block trips follow from its bytes."""

import math

import pytest

from benchmarks import gradient_pass_memory as bench
from tests.tiny_models import save_tiny_llama


@pytest.mark.parametrize("budget", bench.BUDGETS)
def test_each_budget_groups_the_samples_by_its_bytes(monkeypatch, tmp_path, budget):
    monkeypatch.setattr(bench, "GROUP_SAMPLES", 6)
    monkeypatch.setattr(bench, "GROUP_SEQ_LEN", 16)
    model_dir = save_tiny_llama(tmp_path, num_layers=3)
    row = bench.measure_groups(model_dir, budget)
    per_group = max(1, row["group_bytes"] // row["boundary_bytes_per_sample"])
    assert row["groups"] == math.ceil(6 / per_group)
    assert row["block_trips"] == 2 * 3 * row["groups"]
    if budget == "one-batch":
        assert row["groups"] == 6
    if budget == "quarter-of-model":
        assert row["group_bytes"] <= row["model_bytes"] // 4
    assert row["rss_peak_bytes"] > 0
