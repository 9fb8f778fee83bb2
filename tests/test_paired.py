"""Paired method-vs-reference differences over shared seeds."""

import math

import numpy as np
import pandas as pd

from medfm.eval.paired import paired_differences


def _runs(method: str, values: list[float], seeds: list[int] | None = None) -> list[dict]:
    seeds = seeds if seeds is not None else list(range(len(values)))
    return [{"method": method, "regime": "fraction", "budget": 0.1, "seed": s, "auroc": v}
            for s, v in zip(seeds, values)]


def test_paired_differences_pairs_by_seed():
    rng = np.random.default_rng(0)
    luck = rng.normal(0, 0.05, 10)  # the subset's luck, shared by both methods of a seed
    ref = 0.80 + luck
    better = ref + 0.02 + rng.normal(0, 0.005, 10)
    runs = pd.DataFrame(_runs("scratch", list(ref)) + _runs("finetune", list(better))
                        + _runs("knn", [0.9, 0.7], seeds=[3, 42]))  # seed 42 has no reference run
    out = paired_differences(runs, "scratch").set_index("method")
    ft = out.loc["finetune"]
    assert ft["n"] == 10 and ft["wins"] == 10
    assert math.isclose(ft["mean_diff"], float(np.mean(better - ref)), rel_tol=1e-9)
    assert ft["ci_low"] > 0 and ft["ci_high"] < 0.04 and ft["p_greater"] < 0.01
    # Unpaired, the same data would look like a tie: the sd across subsets exceeds the 0.02 gap.
    assert np.std(ref) > 0.02
    knn = out.loc["knn"]
    assert knn["n"] == 1 and math.isnan(knn["ci_low"]) and math.isnan(knn["p_greater"])
    assert math.isclose(knn["mean_diff"], 0.9 - ref[3])


def test_paired_differences_without_reference_is_empty():
    runs = pd.DataFrame(_runs("finetune", [0.8, 0.9]))
    out = paired_differences(runs, "scratch")
    assert out.empty and "mean_diff" in out.columns


def test_write_results_adds_the_paired_table(tmp_path):
    from benchmarks.label_efficiency import write_results

    rows = _runs("scratch ResNet-18 (width 32)", [0.70, 0.80, 0.75]) + _runs("knn", [0.74, 0.83, 0.80])
    res = pd.DataFrame([{**r, "n_labels": 55, "accuracy": 0.7, "time_s": 1.0} for r in rows])
    js, md = write_results("t", res, tmp_path, {"description": "d", "wall_s": 1})
    text = md.read_text()
    assert "against scratch ResNet-18 (width 32)" in text
    assert "| knn | 10% | 3 | +0.040 |" in text and "| 3/3 |" in text
    import json

    d = json.loads(js.read_text())
    assert d["paired_reference"] == "scratch ResNet-18 (width 32)" and d["paired"][0]["wins"] == 3
