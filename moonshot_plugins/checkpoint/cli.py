"""The ``moonshot check`` and ``moonshot export`` subcommands."""

from __future__ import annotations

import argparse
import json
import sys

from moonshot_plugins.atomic import sigterm_raises
from moonshot_plugins.checkpoint.bitmask import LEGACY_CT_VERSION, LEGACY_FORMAT
from moonshot_plugins.checkpoint.check import check_checkpoint
from moonshot_plugins.checkpoint.export import export_sparse24_bitmask
from moonshot_plugins.checkpoint.safetensors_io import CheckpointError


def _cmd_check(args: argparse.Namespace) -> int:
    try:
        report = check_checkpoint(args.checkpoint, args.structure, targets=args.targets, ignore=args.ignore)
    except (CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.summary())
    if not report.ok:
        if not report.layers:
            print(f"error: no layer matched targets {report.targets} (ignore {report.ignore})", file=sys.stderr)
        for layer in report.failing:
            if not layer.is_nm:
                print(f"error: layer {layer.name} ({layer.file}) is not {report.structure}: {layer.reason}",
                      file=sys.stderr)
        for key, found in report.non_finite_tensors.items():
            print(f"error: tensor {key} holds {found}", file=sys.stderr)
        return 1
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    try:
        with sigterm_raises():
            result = export_sparse24_bitmask(args.checkpoint, args.output, targets=args.targets, ignore=args.ignore)
    except (CheckpointError, ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {result.output} ({LEGACY_FORMAT}): {result.layers_compressed} layers compressed, "
        f"global sparsity {result.global_sparsity:.2%}, weights {result.source_bytes / 1e6:.1f} MB -> "
        f"{result.output_bytes / 1e6:.1f} MB"
    )
    return 0


def _add_target_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--targets", action="append", metavar="TARGET",
        help="layers to check (repeatable; class name, exact name or re:REGEX); default: the recipe's, else Linear",
    )
    parser.add_argument(
        "--ignore", action="append", metavar="TARGET",
        help="layers to skip (repeatable); default: the recipe's, else re:.*lm_head",
    )


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``check`` and ``export`` to an argparse subparsers object (``func`` returns the exit code)."""
    check = subparsers.add_parser(
        "check",
        help="per-layer sparsity and N:M check of a saved checkpoint",
        description="Report per targeted layer its sparsity and whether it is exactly N:M, plus the global "
        "sparsity, and every weight tensor for NaN/inf. Exit 0 if every targeted layer is N:M and every tensor "
        "finite, 1 if not (named on stderr), 2 on bad input.",
    )
    check.add_argument("checkpoint", help="checkpoint directory (safetensors, sharded or not)")
    check.add_argument("--structure", default="2:4", help="N:M pattern (default 2:4)")
    _add_target_args(check)
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(func=_cmd_check)

    export = subparsers.add_parser(
        "export",
        help="convert a dense 2:4 checkpoint to the legacy sparse-24-bitmask format",
        description=f"Write the legacy compressed-tensors {LEGACY_FORMAT} checkpoint (for vLLM 0.7-0.19 / "
        f"compressed-tensors <= {LEGACY_CT_VERSION}). OUTPUT must not exist; it appears only when complete.",
    )
    export.add_argument("--format", required=True, choices=[LEGACY_FORMAT], help="output format")
    export.add_argument("checkpoint", help="dense 2:4 checkpoint directory")
    export.add_argument("output", help="new directory to create")
    _add_target_args(export)
    export.set_defaults(func=_cmd_export)
