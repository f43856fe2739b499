"""The ``moonshot`` command line: ``demo``, ``prune``, ``check`` and ``export``.

``moonshot demo`` prunes the real SmolLM2-135M at 2:4 with the host and with
MOONSHOT on Austen calibration text, evaluates perplexity on disjoint text and
saves the MOONSHOT model as a compressed-tensors checkpoint. Everything comes
from package registries (see :mod:`moonshot_plugins.assets`).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import sys
import time
from typing import Any

from moonshot_plugins.checkpoint import register_cli as register_checkpoint_cli
from moonshot_plugins.core import FISHER_MODES
from moonshot_plugins.core.mask_structure import UNSTRUCTURED, sparsity_settings

__all__ = ["main"]

# Calibration and evaluation text never overlap: three novels calibrate,
# a fourth novel and a docs section evaluate.
CALIBRATION_NOVELS = ("emma", "prideprejudice", "sensesensibility")
EVALUATION_NOVEL = "persuasion"
EVALUATION_DOCS = "tutorial"

HOSTS = {"sparsegpt": "SparseGPT", "wanda": "Wanda"}


def _sparsity(text: str) -> dict[str, Any]:
    """'2:4' -> N:M settings; '0.6' -> 60% unstructured."""
    try:
        return sparsity_settings(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--sparsity must be N:M with 0 < N < M (e.g. 2:4) or a fraction in (0, 1), got {text!r}"
        ) from None


def _taylor_weight(text: str) -> float | str:
    from moonshot_plugins.core import validate_taylor_weight

    try:
        return validate_taylor_weight(text, allow_auto=True)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


MODIFIER_DEFAULT = "default"  # make_modifier: the MOONSHOT modifier's own taylor_weight default


def make_modifier(host: str, structure: dict[str, Any], taylor_weight: float | str | None, **extra):
    """The host modifier (taylor_weight None) or its MOONSHOT version
    (taylor_weight a number, "auto", or MODIFIER_DEFAULT); ``extra`` are
    further fields of that modifier (e.g. ``dampening_frac``)."""
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    from moonshot_plugins import MoonshotSparseGPTModifier, MoonshotWandaModifier

    common = dict(structure, targets=["Linear"], ignore=["re:.*lm_head"])
    if taylor_weight is None:
        cls = {"sparsegpt": SparseGPTModifier, "wanda": WandaPruningModifier}[host]
        return cls(**common, **extra)
    cls = {"sparsegpt": MoonshotSparseGPTModifier, "wanda": MoonshotWandaModifier}[host]
    if taylor_weight != MODIFIER_DEFAULT:
        extra["taylor_weight"] = taylor_weight
    return cls(**common, **extra)


def _print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print(" | ".join(c.ljust(widths[c]) for c in columns))
    print("-|-".join("-" * widths[c] for c in columns))
    for row in rows:
        print(" | ".join(_fmt(row.get(c)).ljust(widths[c]) for c in columns))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return "" if value is None else str(value)


# -- demo -------------------------------------------------------------------
def run_demo(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moonshot_plugins.assets import austen_novels, python_docs, smollm2_dir
    from moonshot_plugins.lm import calibration_loader, perplexity, run_oneshot, tokenize

    torch.manual_seed(0)
    model_dir = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    novels = austen_novels()
    calib_ids = tokenize(tokenizer, "\n".join(novels[n] for n in CALIBRATION_NOVELS))
    eval_sets = {
        f"ppl {EVALUATION_NOVEL}": tokenize(tokenizer, novels[EVALUATION_NOVEL], args.eval_tokens),
        f"ppl python-{EVALUATION_DOCS}": tokenize(tokenizer, python_docs(EVALUATION_DOCS), args.eval_tokens),
    }
    loader = calibration_loader(calib_ids, args.calib_samples, args.seq_len)

    def evaluate(model) -> dict[str, float]:
        return {name: perplexity(model, ids, context=args.context, desc=name) for name, ids in eval_sets.items()}

    def load():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    rows = [{"method": "dense", "sparsity": "0%", **evaluate(load())}]
    output = pathlib.Path(args.output)
    label = args.sparsity["mask_structure"] if args.sparsity["mask_structure"] != UNSTRUCTURED else f"{args.sparsity['sparsity']:.0%}"
    moonshot_lam = MODIFIER_DEFAULT if args.taylor_weight is None else args.taylor_weight
    for lam in (None, moonshot_lam):
        extra = {} if lam is None else {"fisher_mode": args.fisher_mode}
        recipe = [make_modifier(args.host, args.sparsity, lam, **extra)]
        name = HOSTS[args.host] if lam is None else f"MOONSHOT-{HOSTS[args.host]} (lam={recipe[0].taylor_weight})"
        # The previous demo output is replaced only once the new one is complete.
        start = time.perf_counter()
        model = run_oneshot(
            load(), recipe, loader, output_dir=output if lam is not None else None,
            replace=True, shuffle_calibration_samples=False,
        )
        seconds = time.perf_counter() - start
        rows.append({"method": name, "sparsity": label, **evaluate(model), "prune seconds": seconds})
        del model

    print()
    print(
        f"SmolLM2-135M, calibration {args.calib_samples} x {args.seq_len} tokens of "
        f"{'+'.join(CALIBRATION_NOVELS)}; evaluation: first {args.eval_tokens} tokens, context {args.context}"
    )
    _print_table(rows, ["method", "sparsity", *eval_sets, "prune seconds"])
    print(f"\nMOONSHOT checkpoint (compressed-tensors, recipe.yaml beside it): {output}")
    return 0


def _add_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="prune the real SmolLM2-135M with the host and with MOONSHOT, compare perplexity",
        description=run_demo.__doc__ or __doc__,
    )
    parser.add_argument("--host", choices=sorted(HOSTS), default="sparsegpt")
    parser.add_argument("--sparsity", type=_sparsity, default="2:4", help="N:M (default 2:4) or a fraction")
    parser.add_argument("--taylor-weight", type=_taylor_weight, default=None,
                        help="lam in [0, 1], or 'auto' (SparseGPT, token mode: a lam per layer); "
                        "default: the modifier's ('auto' for SparseGPT in token mode, else 0.5)")
    parser.add_argument("--fisher-mode", choices=FISHER_MODES, default="token")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument(
        "--output",
        default="outputs/smollm2-135m-moonshot-2of4",
        help="where the MOONSHOT checkpoint goes (replaced only after a successful run)",
    )
    parser.set_defaults(func=run_demo)


# -- prune ------------------------------------------------------------------
def run_prune(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from moonshot_plugins.lm import calibration_loader, run_oneshot, tokenize

    model_dir = pathlib.Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"error: MODEL_DIR {model_dir} has no config.json (need a local Hugging Face model directory)")
    recipe = pathlib.Path(args.recipe)
    if not recipe.is_file():
        raise SystemExit(f"error: --recipe {recipe} is not a file")
    if pathlib.Path(args.output).exists():  # checked again when the output is written
        raise FileExistsError(f"output directory {args.output} already exists; choose a new path or remove it")
    _check_recipe(recipe)
    calib = pathlib.Path(args.calib)
    if calib.is_file():
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        ids = tokenize(tokenizer, calib.read_text(encoding="utf-8"))
        try:
            dataset = calibration_loader(ids, args.num_samples, args.seq_len)
        except ValueError as err:
            raise ValueError(f"--calib {calib}: {err}; give more text or lower --num-samples / --seq-len") from None
        extra = {}
    elif calib.is_dir():
        from datasets import load_from_disk

        dataset = load_from_disk(str(calib))
        extra = dict(
            num_calibration_samples=args.num_samples,
            max_seq_length=args.seq_len,
            text_column=args.text_column,
        )
    else:
        raise SystemExit(f"error: --calib {calib} is neither a text file nor a datasets directory")
    run_oneshot(str(model_dir), str(recipe), dataset, output_dir=args.output, **extra)
    print(f"saved pruned model to {args.output}")
    return 0


def _check_recipe(path: pathlib.Path) -> None:
    """Build the recipe's modifiers once before any work, so that a bad recipe
    fails at once (each modifier validates its own fields)."""
    import yaml
    from llmcompressor.recipe import Recipe

    import moonshot_plugins.llmcompressor  # noqa: F401  (registers the MOONSHOT modifiers)

    try:
        Recipe.create_instance(str(path))
    except yaml.YAMLError as err:
        raise ValueError(f"--recipe {path} is not valid YAML: {' '.join(str(err).split())}") from None
    except ValueError as err:  # pydantic's ValidationError included
        raise ValueError(f"--recipe {path}: {_one_line(err)}") from err


def _add_prune(subparsers) -> None:
    parser = subparsers.add_parser(
        "prune",
        help="prune a local causal LM with a recipe (thin layer over llmcompressor.oneshot)",
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="local Hugging Face model directory")
    parser.add_argument("--recipe", required=True, help="recipe YAML (e.g. recipes/moonshot_sparsegpt_2of4.yaml)")
    parser.add_argument(
        "--calib", required=True, help="plain-text file, or a directory saved by datasets' save_to_disk"
    )
    parser.add_argument("--output", required=True, help="output directory (must not exist)")
    parser.add_argument("--num-samples", type=int, default=32, help="calibration samples (default 32)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sample (default 512)")
    parser.add_argument("--text-column", default="text", help="text column of a datasets directory")
    parser.set_defaults(func=run_prune)


DEBUG_ENVIRONMENT = "MOONSHOT_DEBUG"  # =1: as --debug
_DEBUG_HELP = f"show the full traceback of an error (or set {DEBUG_ENVIRONMENT}=1)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moonshot", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_demo(subparsers)
    _add_prune(subparsers)
    register_checkpoint_cli(subparsers)
    for subparser in subparsers.choices.values():
        # also after the subcommand; SUPPRESS keeps a top-level --debug when absent here
        subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; an error becomes one ``error: ...`` line on stderr and
    exit code 1 (130 on Ctrl-C), unless ``--debug`` or MOONSHOT_DEBUG=1 asks
    for the traceback. Every output directory is written atomically, so an
    error leaves nothing behind."""
    args = build_parser().parse_args(argv)
    if args.debug or os.environ.get(DEBUG_ENVIRONMENT, "") not in ("", "0"):
        return args.func(args)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("error: interrupted, nothing written", file=sys.stderr)
        return 128 + signal.SIGINT
    except SystemExit as exc:
        if exc.code == 128 + signal.SIGTERM:  # raised by moonshot_plugins.atomic.sigterm_raises
            print("error: terminated, nothing written", file=sys.stderr)
        raise
    except Exception as exc:  # noqa: BLE001  (every error becomes one line; --debug shows it whole)
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 1


def _one_line(exc: Exception) -> str:
    """What went wrong, on one line: a pydantic error as "Model.field: message"
    per problem; an error we did not foresee with its type and the --debug hint."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        problems = [
            f"{exc.title}{''.join(f'.{part}' for part in error['loc'])}: "
            f"{error['msg'].removeprefix('Value error, ')}"
            for error in exc.errors()
        ]
        return "; ".join(problems)
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (ValueError, OSError)):  # what bad input raises
        return text
    return f"{type(exc).__name__}: {text} (run with --debug for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
