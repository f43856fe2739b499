"""Property test of the recipe fields, with plain ``random`` and a fixed seed.

Every case gives a random subset of the MOONSHOT fields and of the host
fields the modifiers pass through, each a random value of a random type.
The property: the modifier either constructs or raises a pydantic
ValidationError naming one of the fields at fault; which one is predicted by
:func:`faults`, the rules written out independently of the code. For a few
constructed cases the tiny model is then pruned: it either raises ValueError
naming a field at fault (a rule that needs the model) or prunes exactly the
selected layers with exact N:M or unstructured sparsity as asked, leaving
every other layer unchanged. Nothing else may happen.
"""

from __future__ import annotations

import math
import random
import re
import string

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from moonshot_plugins import MoonshotSparseGPTModifier, MoonshotWandaModifier
from moonshot_plugins.lm import calibration_loader, run_oneshot

SEED = 20261201
CASES = 1000
PRUNED = 14  # constructed cases that also prune the tiny model (about 1-2 s each)
WIDTHS = (64, 128)  # the tiny Llama's input widths (hidden and intermediate size)
SPARSEGPT_ONLY = ("row_weights", "block_size", "fisher_rows", "fisher_row_rank", "admm_rho")
# fields drawn less often: valid only together with others, they would make
# most cases fail
RARE = {"fisher_rows": 0.2, "fisher_row_rank": 0.15, "resolve_max_iters": 0.2, "admm_rho": 0.15}
BOOL_TEXT = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False,
             "1": True, "0": False, "t": True, "f": False, "y": True, "n": False}


# -- the rules, one predicate per field ----------------------------------------------------

def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fraction(v) -> bool:
    return _number(v) and 0 < v < 1


def _structure(v) -> tuple[int, int] | None:
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", v) if isinstance(v, str) else None
    if match is None:
        return None
    n, m = int(match[1]), int(match[2])
    return (n, m) if (n, m) == (0, 0) or 0 < n < m else None


def _taylor_weight(v) -> bool:
    if v == "auto":
        return True
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        return False
    try:
        return 0 <= float(v) <= 1
    except ValueError:
        return False


def _bool(v) -> bool | None:
    """pydantic's lax bool, or None when it refuses the value."""
    if isinstance(v, bool):
        return v
    if _number(v) and v in (0, 1):
        return bool(v)
    if isinstance(v, str):
        return BOOL_TEXT.get(v.lower())
    return None


def _pattern(v) -> bool:
    if not isinstance(v, str) or not v:
        return False
    try:
        re.compile(v[3:]) if v.startswith("re:") else None
        return True
    except re.error:
        return False


VALID = {
    "sparsity": lambda v: v is None or _fraction(v) or (isinstance(v, list) and bool(v) and all(map(_fraction, v))),
    "mask_structure": lambda v: _structure(v) is not None,
    "taylor_weight": _taylor_weight,
    "fisher_mode": lambda v: v in ("token", "sample"),
    "fisher_samples": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "gradient_dtype": lambda v: v in ("auto", "bfloat16", "float32"),
    "row_weights": lambda v: _bool(v) is not None,
    "weight_update": lambda v: v in ("host", "resolve", "admm"),
    "fisher_rows": lambda v: v in ("shared", "per_row"),
    "fisher_row_rank": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "resolve_max_iters": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "admm_rho": lambda v: _number(v) and math.isfinite(v) and v > 0,
    "offload_fisher": lambda v: _bool(v) is not None,
    "block_size": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    "dampening_frac": lambda v: _number(v) and math.isfinite(v) and v >= 0,
    "targets": lambda v: (isinstance(v, str) and _pattern(v)) or (isinstance(v, list) and bool(v) and all(map(_pattern, v))),
    "ignore": lambda v: isinstance(v, list) and all(map(_pattern, v)),
}


def faults(cls, fields: dict) -> set[str]:
    """The fields at fault at construction (empty: it must construct)."""
    bad = {f for f, v in fields.items() if (f in SPARSEGPT_ONLY and cls is MoonshotWandaModifier) or not VALID[f](v)}
    if cls is MoonshotWandaModifier and fields.get("weight_update") == "admm":
        bad.add("weight_update")  # Wanda: host or resolve
    if bad:
        return bad  # pydantic runs the cross-field rules only on valid fields
    n, m = _structure(fields.get("mask_structure", "0:0"))
    sparsity = fields.get("sparsity")
    if m == 0 and sparsity is None:
        bad |= {"sparsity", "mask_structure"}
    if m and sparsity is not None and any(abs(s - n / m) > 1e-6 for s in (sparsity if isinstance(sparsity, list) else [sparsity])):
        bad |= {"sparsity", "mask_structure"}
    sample = fields.get("fisher_mode") == "sample"
    if fields.get("taylor_weight") == "auto" and sample:
        bad |= {"taylor_weight", "fisher_mode"}
    if "resolve_max_iters" in fields and fields.get("weight_update", "host") == "host":
        bad |= {"resolve_max_iters", "weight_update"}
    if cls is MoonshotSparseGPTModifier:
        if "admm_rho" in fields and fields.get("weight_update", "host") != "admm":
            bad |= {"admm_rho", "weight_update"}
        if _bool(fields.get("row_weights", False)) and (sample or m):
            bad |= {"row_weights", "fisher_mode", "mask_structure"}
        if m and fields.get("block_size", 128) % m:
            bad |= {"block_size", "mask_structure"}
        if fields.get("fisher_rows") == "per_row":
            if fields.get("weight_update", "host") == "host":
                bad |= {"fisher_rows", "weight_update"}
            elif not sample:
                bad |= {"fisher_rows", "fisher_mode"}
        elif "fisher_row_rank" in fields:
            bad |= {"fisher_row_rank", "fisher_rows"}
    return bad


def selected_layers(fields: dict, linear_names: list[str]) -> set[str]:
    """The Linear layers the targets select and ignore leaves (compressed-tensors' rules)."""
    targets = fields.get("targets", ["Linear"])
    targets = [targets] if isinstance(targets, str) else targets

    def matches(name, pattern):
        return pattern == "Linear" or pattern == name or (pattern.startswith("re:") and re.match(pattern[3:], name))

    return {
        name for name in linear_names
        if any(matches(name, t) for t in targets) and not any(matches(name, i) for i in fields.get("ignore", []))
    }


def run_faults(fields: dict, selected: set[str]) -> set[str]:
    """The fields at fault once the model is known (empty: it must prune)."""
    _, m = _structure(fields.get("mask_structure", "0:0"))
    if not selected:
        return {"targets", "ignore"}
    if m and any(width % m for width in WIDTHS):
        return {"mask_structure"}
    return set()


# -- random values of random types ---------------------------------------------------------

TYPICAL = {
    "sparsity": [None, 0.5, 0.3, 0.75, 0.0, 1.0, -0.2, True, "0.5", [0.5, 0.5]],
    "mask_structure": ["0:0", "2:4", "1:4", "3:4", "1:2", "2:8", " 2 : 4 ", "2:3", "abc", "4:2", "0:4", "", 24, None],
    "taylor_weight": ["auto", 0.0, 0.25, 1.0, 1, "0.5", True, False, -0.1, 1.5, "half", None, float("nan")],
    "fisher_mode": ["token", "sample", "batch", "", 1, None],
    "fisher_samples": [None, 1, 3, 100, 0, -2, True, 2.5, "3"],
    "gradient_dtype": ["auto", "float32", "bfloat16", "float16", None, 32],
    "row_weights": [True, False, "yes", "off", 0, 1, 2, "maybe", None, 0.5],
    "weight_update": ["host", "resolve", "admm", "ADMM", None, 0],
    "fisher_rows": ["shared", "per_row", "rows", "", None, 1],
    "fisher_row_rank": [None, 8, 2, 1, 0, -1, True, 2.5, "8"],
    "resolve_max_iters": [None, 50, 1, 0, -3, True, 2.5, "50"],
    "admm_rho": [0.1, 0.3, 1, 0, -0.2, float("nan"), float("inf"), True, "0.3", None],
    "offload_fisher": [True, False, "true", 1, "maybe", None],
    "block_size": [128, 64, 32, 96, 4, 3, 1, 0, -4, True, 2.5, "128"],
    "dampening_frac": [0.01, 0.0, 0.1, -0.1, float("nan"), float("inf"), None, True, "0.01"],
    "targets": [["Linear"], "Linear", ["re:.*proj"], ["re:.*mlp\\..*"], [], ["re:("], 5, [5], ["NoSuchLayer"], ""],
    "ignore": [["re:.*lm_head"], [], ["re:.*lm_head", "re:.*down_proj"], "re:.*lm_head", ["re:("], [5], ["re:.*"], [""]],
}


def junk(rng: random.Random):
    """A value of a random type."""
    kind = rng.randrange(8)
    if kind == 0:
        return rng.uniform(-2.0, 2.0)
    if kind == 1:
        return rng.randint(-5, 300)
    if kind == 2:
        return "".join(rng.choices(string.ascii_letters + ":.-", k=rng.randint(0, 6)))
    if kind == 3:
        return f"{rng.randint(0, 9)}:{rng.randint(0, 9)}"
    if kind == 4:
        return [rng.choice([rng.uniform(0, 1), rng.randint(0, 3), "Linear", "re:.*"]) for _ in range(rng.randint(0, 2))]
    if kind == 5:
        return {"value": rng.random()}
    if kind == 6:
        return rng.choice([True, False, None])
    return rng.choice(["auto", "token", "sample", "float32", "host", "admm"])


def random_case(rng: random.Random) -> tuple[type, dict]:
    cls = rng.choice([MoonshotSparseGPTModifier, MoonshotWandaModifier])
    fields = {}
    for field, typical in TYPICAL.items():
        if rng.random() < RARE.get(field, 0.45):
            if rng.random() < 0.1:
                fields[field] = junk(rng)
                continue
            valid = [v for v in typical if VALID[field](v)]
            fields[field] = rng.choice(valid if rng.random() < 0.85 else typical)
    structure = _structure(fields.get("mask_structure", "0:0"))
    if structure and rng.random() < 0.5:  # a sparsity that fits the structure, often enough to construct
        n, m = structure
        fields["sparsity"] = n / m if m else round(rng.uniform(0.05, 0.95), 3)
    if ("fisher_rows" in fields or "fisher_row_rank" in fields) and rng.random() < 0.5:
        # the context per_row needs, often enough to construct
        fields.update(fisher_rows="per_row", fisher_mode="sample", weight_update=rng.choice(["resolve", "admm"]))
    if "admm_rho" in fields and rng.random() < 0.5:  # the update it needs, often enough to construct
        fields["weight_update"] = "admm"
    return cls, fields


def _names_a_field(message: str, fields: set[str]) -> bool:
    return any(re.search(rf"\b{f}\b", message) for f in fields)


def _problems(err: ValidationError) -> str:
    """Where and what, without pydantic's echo of the input (which names every field given)."""
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())


# -- the property --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def loader():
    torch.manual_seed(0)
    return calibration_loader(torch.randint(4, 60, (400,)), num_samples=4, seq_len=16)


def _prunes_as_asked(model_dir, loader, cls, fields, modifier) -> bool:
    """True when it pruned (as asked), False when it raised naming a field at fault."""
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    linear = {n: m.weight.detach().clone() for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear)}
    selected = selected_layers(fields, list(linear))
    expected = run_faults(fields, selected)
    try:
        pruned = run_oneshot(dense, [modifier], loader, shuffle_calibration_samples=False)
    except ValueError as err:
        assert expected and _names_a_field(str(err), expected), (cls.__name__, fields, str(err))
        return False
    assert not expected, (cls.__name__, fields, "ran, but should fail on", expected)
    n, m = _structure(fields.get("mask_structure", "0:0"))
    weights = {name: mod.weight.detach() for name, mod in pruned.named_modules() if name in linear}
    for name, weight in weights.items():
        if name not in selected:
            assert torch.equal(weight, linear[name]), (name, fields)
        elif m:
            zeros = (weight.reshape(weight.shape[0], -1, m) == 0).sum(-1)
            assert (zeros == n).all(), (name, fields)
        else:  # exact up to the hosts' rounding: a row's floor (Wanda, ADMM), one more per block (SparseGPT)
            d_out, d_in = weight.shape
            blocks = math.ceil(d_in / getattr(modifier, "block_size", d_in))
            slack = 1 / d_in + blocks / weight.numel() + 1e-6
            assert abs((weight == 0).float().mean().item() - modifier.sparsity) <= slack, (name, fields)
    return True


def test_recipe_fields_construct_prune_exactly_or_name_the_field(tiny_llama_dir, loader):
    rng = random.Random(SEED)
    constructed = failed = 0
    runs = []  # per pruned case: True = pruned as asked, False = raised naming the field
    for _ in range(CASES):
        cls, fields = random_case(rng)
        expected = faults(cls, fields)
        try:
            modifier = cls(**fields)
        except ValidationError as err:
            assert expected, (cls.__name__, fields, _problems(err))
            assert _names_a_field(_problems(err), expected), (cls.__name__, fields, expected, _problems(err))
            failed += 1
            continue
        assert not expected, (cls.__name__, fields, "constructed, but should fail on", expected)
        constructed += 1
        if len(runs) < PRUNED and not isinstance(modifier.sparsity, list):
            runs.append(_prunes_as_asked(tiny_llama_dir, loader, cls, fields, modifier))
    # the draw covers every outcome
    assert constructed > 100 and failed > 500 and runs.count(True) >= 8 and False in runs, (constructed, runs)
