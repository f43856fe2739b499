"""The evaluation protocol's draws and paired statistics (benchmarks/protocol.py)."""

import json
import math
import os

import pytest
import torch

from benchmarks.protocol import draw_loader, draw_starts, mean_and_error, paired_ratios, verdict


def _refused_by_flag_check(argv, capsys):
    """``benchmarks.llm`` refuses ``argv`` in its flag checks, before anything
    runs: not merely because ``--report-only`` has no results file to read."""
    from benchmarks.llm import main

    with pytest.raises(SystemExit):
        main([*argv, "--report-only"])
    error = capsys.readouterr().err
    assert "error:" in error and "--report-only reads" not in error, (argv, error)


def test_draws_are_seeded_non_overlapping_and_differ_between_seeds():
    starts = draw_starts(10_000, 16, 128, seed=1)
    assert starts == draw_starts(10_000, 16, 128, seed=1)
    assert starts != draw_starts(10_000, 16, 128, seed=2)
    assert all(b - a >= 128 for a, b in zip(starts, starts[1:]))
    assert starts[-1] + 128 <= 10_000
    with pytest.raises(ValueError, match="holds 78 windows of 128, need 100"):
        draw_starts(10_000, 100, 128, seed=0)


def test_draw_loader_yields_the_windows():
    ids = torch.arange(1000)
    batches = list(draw_loader(ids, 4, 50, seed=3))
    starts = draw_starts(1000, 4, 50, seed=3)
    assert [int(b["input_ids"][0, 0]) for b in batches] == starts
    assert all(b["attention_mask"].shape == (1, 50) for b in batches)


def test_mean_and_error():
    mean, error = mean_and_error([1.0, 2.0, 3.0])
    assert mean == 2.0 and error == pytest.approx(1 / math.sqrt(3))
    assert mean_and_error([5.0]) == (5.0, 0.0)


def _runs(ratios_by_source):
    runs = []
    for source, ratios in ratios_by_source.items():
        for draw, ratio in enumerate(ratios):
            base = {"sparsity": "2:4", "host": "sparsegpt", "calib_source": source, "draw": draw}
            runs.append({**base, "method": "host", "ppl_a": 100.0 + draw})
            runs.append({**base, "method": "moonshot", "ppl_a": (100.0 + draw) * ratio})
    return runs


def test_ratios_are_paired_per_draw_and_judged_by_the_fixed_rule():
    mine = lambda r: r["method"] == "moonshot"  # noqa: E731
    helps = paired_ratios(_runs({"austen": [0.9, 0.91, 0.89], "python-docs": [0.95, 0.94, 0.96]}), mine, ["a"])
    assert helps[("austen", "a")]["ratio"][0] == pytest.approx(0.9)
    assert helps[("austen", "a")]["draws"] == 3
    assert verdict(helps, 2) == "helps"
    assert verdict(helps) == "incomplete"  # 2 of the 6 cells of both sources x 3 texts
    noisy = paired_ratios(_runs({"austen": [0.7, 1.2, 0.9], "python-docs": [0.6, 1.3, 0.95]}), mine, ["a"])
    assert verdict(noisy, 2) == "mixed"
    loses = paired_ratios(_runs({"austen": [0.9, 0.9, 0.9], "python-docs": [1.01, 1.0, 1.02]}), mine, ["a"])
    assert verdict(loses, 2) == "loses somewhere"
    one_draw = paired_ratios(_runs({"austen": [0.5], "python-docs": [0.5]}), mine, ["a"])
    assert verdict(one_draw, 2) == "incomplete"  # no verdict from a single draw


def test_solver_plan_pairs_each_host_with_its_own_weight_updates():
    from benchmarks.llm import make_plan

    plan = make_plan("solver", ("2:4",), ("sparsegpt", "wanda"), ("resolve", "admm"))
    updates = {(r["host"], r["lam"], r.get("options", {}).get("weight_update")) for r in plan}
    assert ("wanda", 0.0, "resolve") in updates and ("sparsegpt", 0.0, "admm") in updates
    assert not any(host == "wanda" and update == "admm" for host, _, update in updates)
    for host in ("sparsegpt", "wanda"):  # the host run first, so every method has its pair
        assert [r["method"] for r in plan if r["host"] == host][0] == "host"


def test_solver_plan_restricted_to_one_lam_or_damped_keeps_its_pairs(capsys):
    from benchmarks.llm import make_plan

    plan = make_plan("solver", ("2:4",), ("sparsegpt",), ("admm",), update_lams=("auto",))
    assert [(r["method"], r["lam"], r.get("options", {}).get("weight_update")) for r in plan] == [
        ("host", None, None), ("moonshot", "auto", None), ("moonshot", "auto", "admm")]
    damped = make_plan("solver", ("2:4",), ("sparsegpt",), ("admm",), update_lams=("auto",), dampening_frac=0.1)
    # the host also runs at the damping, so the damping's own gain is measured apart
    assert [(r["method"], r.get("options", {}).get("dampening_frac")) for r in damped] == [
        ("host", None), ("moonshot", None), ("host", 0.1), ("moonshot", 0.1)]
    for flag, value in (("--taylor-weight", "auto"), ("--dampening-frac", "0.1")):
        _refused_by_flag_check(["--plan", "defaults", flag, value], capsys)


def test_solver_plan_gives_update_options_to_its_weight_updates_only(capsys):
    from benchmarks.llm import make_plan

    fast = {"admm_rho": 0.3, "fisher_samples": 16}
    plan = make_plan("solver", ("2:4",), ("sparsegpt",), ("admm",), update_lams=("auto",), dampening_frac=0.1,
                     update_options=fast)
    assert [{k: r.get("options", {}).get(k) for k in ("dampening_frac", *fast)} for r in plan] == [
        {"dampening_frac": None, "admm_rho": None, "fisher_samples": None},  # SparseGPT
        {"dampening_frac": None, "admm_rho": None, "fisher_samples": None},  # the default
        {"dampening_frac": 0.1, "admm_rho": None, "fisher_samples": None},  # SparseGPT, damped
        {"dampening_frac": 0.1, "admm_rho": 0.3, "fisher_samples": 16}]
    # the default's own update with fewer gradient samples is a run of its own
    half = make_plan("solver", ("2:4",), ("sparsegpt",), ("host",), update_lams=("auto",),
                     update_options={"fisher_samples": 16})
    assert [(r["lam"], r.get("options", {})) for r in half] == [
        (None, {}), ("auto", {}), ("auto", {"fisher_samples": 16})]
    for argv in (["--plan", "defaults", "--fisher-samples", "16"],
                 ["--plan", "solver", "--admm-rho", "0.3"],  # resolve runs have no ADMM
                 ["--plan", "solver", "--weight-update", "resolve", "--weight-update", "admm", "--admm-rho", "0.3"]):
        _refused_by_flag_check(argv, capsys)


def test_solver_plan_fisher_rows_runs_its_updates_in_sample_mode_with_their_cap(capsys):
    from benchmarks.llm import make_plan

    for rows, cap in (("per_row", 300), ("shared", None)):  # per_row's default PCG cap is recorded
        plan = make_plan("solver", ("2:4",), ("sparsegpt",), ("resolve",), update_lams=(0.5,),
                         update_options={"fisher_rows": rows})
        host, default, update = plan
        assert (host["fisher_mode"], default["fisher_mode"]) == ("token", "token")  # the recorded pairs
        assert "fisher_rows" not in default.get("options", {})
        assert update["fisher_mode"] == "sample" and update["options"]["fisher_rows"] == rows
        assert update["options"].get("resolve_max_iters") == cap
    for argv in (["--plan", "defaults", "--fisher-rows", "per_row"],
                 ["--plan", "solver", "--fisher-rows", "per_row"],  # Wanda has no fisher_rows
                 ["--plan", "solver", "--host", "wanda", "--fisher-rows", "per_row"],
                 ["--plan", "solver", "--host", "sparsegpt", "--weight-update", "host", "--fisher-rows", "shared"]):
        _refused_by_flag_check(argv, capsys)
    # --fisher-rows at auto: the modifier refuses it (test_a_run_no_modifier_accepts_stops_the_plan_before_any_run)


def test_solver_plan_fisher_dtype_runs_wandas_default_with_a_bf16_diagonal(capsys):
    from benchmarks.llm import make_plan

    plan = make_plan("solver", ("2:4",), ("wanda",), ("host",), update_lams=(0.5,),
                     update_options={"fisher_dtype": "bfloat16"})
    assert [(r["method"], r["lam"], r.get("options", {})) for r in plan] == [
        ("host", None, {}), ("moonshot", 0.5, {}), ("moonshot", 0.5, {"fisher_dtype": "bfloat16"})]
    for argv in (["--plan", "defaults", "--fisher-dtype", "bfloat16"],
                 ["--plan", "solver", "--fisher-dtype", "bfloat16"],  # SparseGPT has no fisher_dtype
                 ["--plan", "solver", "--host", "sparsegpt", "--fisher-dtype", "bfloat16"]):
        _refused_by_flag_check(argv, capsys)


def test_solver_plan_caps_only_its_weight_updates_and_records_caps_other_than_100(capsys):
    from benchmarks.llm import make_plan

    def caps(plan):
        return [r.get("options", {}).get("resolve_max_iters", "none") for r in plan]

    plain = make_plan("solver", ("2:4",), ("sparsegpt", "wanda"), ("resolve",))
    capped = make_plan("solver", ("2:4",), ("sparsegpt", "wanda"), ("resolve",), resolve_max_iters=25)
    hundred = make_plan("solver", ("2:4",), ("sparsegpt", "wanda"), ("resolve",), resolve_max_iters=100)
    # per host: the host run, the default (no update), then the update at lam 0 and the default lam
    assert caps(plain) == ["none", "none", "none", "none", "none", "none", 50, 50]  # Wanda's default cap
    assert caps(capped) == ["none", "none", 25, 25, "none", "none", 25, 25]
    assert caps(hundred) == ["none"] * 8  # the cap every record without one ran at
    for before, after in zip(plain, capped):  # the host and default runs stay the recorded ones
        if "weight_update" not in before.get("options", {}):
            assert after == before
    for argv in (["--plan", "defaults", "--resolve-max-iters", "50"], ["--plan", "solver", "--resolve-max-iters", "0"]):
        _refused_by_flag_check(argv, capsys)


def test_ratios_pair_with_any_baseline_of_the_same_draw():
    runs = _runs({"austen": [0.8, 0.9, 1.0], "python-docs": [0.8, 0.9, 1.0]})
    runs += [{**r, "method": "other", "ppl_a": r["ppl_a"] * 2} for r in runs if r["method"] == "moonshot"]
    cells = paired_ratios(runs, lambda r: r["method"] == "other", ["a"], baseline=lambda r: r["method"] == "moonshot")
    assert cells[("austen", "a")]["ratio"] == pytest.approx((2.0, 0.0))
    assert cells[("austen", "a")]["host_ppl"][0] == pytest.approx(sum((100.0 + d) * x for d, x in enumerate([0.8, 0.9, 1.0])) / 3)


def test_report_only_refuses_a_missing_results_file(tmp_path, monkeypatch):
    import benchmarks.llm as llm

    written = []
    monkeypatch.setattr(llm, "write_protocol_block", lambda doc, output, tables: written.append(output))
    with pytest.raises(SystemExit):
        llm.main(["--plan", "solver", "--output", str(tmp_path / "absent.json"), "--report-only"])
    assert written == [] and not (tmp_path / "absent.json").exists()


def test_only_the_protocols_settings_write_the_results_page(tmp_path, monkeypatch):
    import benchmarks.llm as llm

    written = []
    monkeypatch.setattr(llm, "write_protocol_block", lambda doc, output, tables: written.append(output))
    runs = [{"method": "host", "sparsity": "2:4", "host": "sparsegpt", "lam": None, "fisher_mode": "token",
             "calib_source": "austen", "draw": 0, "ppl_persuasion": 10.0}]
    for eval_tokens, expected in ((1024, []), (8192, ["pairs.json"])):
        output = tmp_path / "pairs.json"
        output.write_text(json.dumps({"command": "c", "machine": "m", "date": "2026-12-03", "runs": runs,
                                      "settings": {"calib_samples": 32, "seq_len": 512,
                                                   "eval_tokens": eval_tokens, "context": 1024}}))
        written.clear()
        llm.main(["--plan", "solver", "--eval-tokens", str(eval_tokens), "--output", str(output), "--report-only"])
        assert [p.name for p in written] == expected


def _setting_runs(method, lam, options, ratio):
    """One 2:4 SparseGPT configuration's runs over 2 sources x 3 draws, with
    perplexity ``ratio`` times the draw's host perplexity on text "a"."""
    return [{"method": method, "sparsity": "2:4", "host": "sparsegpt", "lam": lam,
             "fisher_mode": "token", **({"options": options} if options else {}), "calib_source": source,
             "draw": draw, "ppl_a": (100.0 + draw) * ratio}
            for source in ("austen", "python-docs") for draw in range(3)]


def test_a_damped_host_is_a_row_and_the_baseline_of_moonshot_at_equal_damping():
    from benchmarks.protocol_report import protocol_tables
    from benchmarks.report import run_label

    damped = {"dampening_frac": 0.1}
    runs = (_setting_runs("host", None, None, 1.0) + _setting_runs("host", None, damped, 0.9)
            + _setting_runs("moonshot", "auto", {"weight_update": "admm", **damped}, 0.72))
    tables = "\n".join(protocol_tables(runs, ("a",)))
    assert run_label(runs[6]) == "SparseGPT (dampening_frac=0.1)"
    ratio_block, damping_block = tables.split("MOONSHOT at equal damping")
    assert "SparseGPT (dampening_frac=0.1) | 0.900" in ratio_block  # ratio to the undamped host
    assert "| 0.720" in ratio_block
    assert "| 0.800" in damping_block and "0.720" not in damping_block  # 0.72 / 0.9


def test_taylor_only_on_the_same_solver_is_planned_on_request_and_paired_with_the_mixed_lam():
    from benchmarks.llm import make_plan
    from benchmarks.protocol_report import protocol_tables

    plan = make_plan("solver", ("2:4",), ("sparsegpt",), ("admm",), update_lams=(1.0,))
    assert [(r["lam"], r.get("options", {}).get("weight_update")) for r in plan][-1] == (1.0, "admm")
    assert [r["lam"] for r in make_plan("solver", ("2:4",), ("sparsegpt",), ("admm",))][-2:] == [0.0, "auto"]

    admm = {"weight_update": "admm"}
    runs = _setting_runs("host", None, None, 1.0)
    for lam, ratio in ((0.0, 0.8), ("auto", 0.72), (1.0, 0.9)):
        runs += _setting_runs("moonshot", lam, admm, ratio)
    tables = "\n".join(protocol_tables(runs, ("a",)))
    taylor_block, reconstruction_block = tables.split("the Taylor term at equal solver")[1].split(
        "the reconstruction term at equal solver")
    assert "lam=auto / lam=0 | 0.900" in taylor_block and "lam=1.0 / lam=0" not in taylor_block
    assert "lam=auto / lam=1 | 0.800" in reconstruction_block


def test_host_modifier_takes_its_own_fields():
    from moonshot_plugins.cli import make_modifier

    host = make_modifier("sparsegpt", {"sparsity": 0.5, "mask_structure": "2:4"}, None, dampening_frac=0.1)
    assert type(host).__name__ == "SparseGPTModifier" and host.dampening_frac == 0.1


def test_the_hosts_own_update_is_planned_without_repeats_and_the_default_meets_each_single_objective():
    from benchmarks.llm import make_plan
    from benchmarks.protocol_report import protocol_tables

    plan = make_plan("solver", ("0.6",), ("sparsegpt",), ("host", "admm"), update_lams=(0.0, "auto", 1.0))
    # the host's update at lam 0 is the host run and at the default lam the default run: neither repeats
    assert [(r["method"], r["lam"], r["options"].get("weight_update")) for r in plan if "options" in r] == [
        ("moonshot", "auto", None), ("moonshot", 1.0, None),
        ("moonshot", 0.0, "admm"), ("moonshot", "auto", "admm"), ("moonshot", 1.0, "admm")]
    assert all(r["options"]["row_weights"] for r in plan if "options" in r)  # the 60% default's own option

    runs = _setting_runs("host", None, None, 1.0) + _setting_runs("moonshot", "auto", None, 0.9)
    runs += _setting_runs("moonshot", 1.0, None, 0.95) + _setting_runs("moonshot", 0.0, {"weight_update": "admm"}, 0.8)
    tables = "\n".join(protocol_tables(runs, ("a",)))
    reconstruction_block, default_block = tables.split("the reconstruction term at equal solver")[1].split(
        "the default against each single objective")
    assert "weight_update=host: lam=auto / lam=1 | 0.947" in reconstruction_block  # 0.9 / 0.95
    assert "default / weight_update=host, lam=1 | 0.947" in default_block
    assert "default / weight_update=admm, lam=0 | 1.125" in default_block  # 0.9 / 0.8: the default loses there


def test_a_run_no_modifier_accepts_stops_the_plan_before_any_run(tmp_path, monkeypatch, capsys):
    import benchmarks.llm as llm

    started = []
    monkeypatch.setattr(llm, "run_plan", lambda *args: started.append(args))
    monkeypatch.setattr(llm, "write_protocol_block", lambda doc, output, tables: None)
    output = tmp_path / "plan.json"
    # sample mode (--fisher-rows) at auto, given or the default lam: the SparseGPT modifier refuses it
    for lams, rows in ((["--taylor-weight", "auto"], "per_row"), ([], "shared")):
        with pytest.raises(SystemExit, match="taylor_weight") as refusal:
            llm.main(["--plan", "solver", "--sparsity", "2:4", "--host", "sparsegpt", "--weight-update", "resolve",
                      *lams, "--fisher-rows", rows, "--draws", "1", "--output", str(output)])
        assert "nothing was run" in str(refusal.value) and f"'fisher_rows': '{rows}'" in str(refusal.value)
        assert started == [] and not output.exists()
    # a plan every modifier accepts reaches run_plan
    llm.main(["--plan", "solver", "--sparsity", "2:4", "--host", "sparsegpt", "--weight-update", "resolve",
              "--taylor-weight", "0.5", "--fisher-rows", "per_row", "--draws", "1", "--output", str(output)])
    assert len(started) == 1 and len(started[0][1]) == 2 * 3  # host, default, the update; per source


def test_each_run_records_the_machine_and_library_versions_it_met(tmp_path, monkeypatch):
    # a results file gathers runs over days, and one pinned only to a range
    # (transformers) can move a run's floats: each run says what it met
    import subprocess
    from importlib import metadata

    import benchmarks.llm as llm

    def child(*args, **kwargs):
        return subprocess.CompletedProcess(args, 0, stdout='RESULT {"prune_seconds": 1.5}\n', stderr="")

    monkeypatch.setattr(llm.subprocess, "run", child)
    doc, output = {"runs": []}, tmp_path / "runs.json"
    plan = [{"method": "host", "host": "wanda", "sparsity": "2:4", "lam": None, "fisher_mode": "token"}]
    llm.run_plan(doc, plan, {"calib_samples": 2}, output)
    (run,) = json.loads(output.read_text())["runs"]
    assert run["prune_seconds"] == 1.5 and run["date"] and run["code"]
    assert f"transformers {metadata.version('transformers')}" in run["libraries"]
    assert f"llmcompressor {metadata.version('llmcompressor')}" in run["libraries"]
    assert run["machine"].startswith(f"{os.cpu_count()} cores ") and f"threads {torch.get_num_threads()}" in run["machine"]
