"""The gradient pass one decoder layer at a time against the whole-model pass."""

import contextlib
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmcompressor.modifiers.utils.hooks import HooksMixin

from moonshot_plugins import MoonshotSparseGPTModifier
from moonshot_plugins.core import FisherCollector, resolve_gradient_dtype, run_gradient_pass
from moonshot_plugins.core.blockwise_pass import blocks_bypassed, group_budget
from moonshot_plugins.llmcompressor import gradient_pass
from moonshot_plugins.llmcompressor.causal_lm import CausalLMLosses
from moonshot_plugins.llmcompressor.gradient_pass import (
    collect_layer_statistics,
    model_ends,
    onloaded,
    run_gradient_pass_by_blocks,
)
from tests.test_modifiers import COMMON, loader, prune  # noqa: F401  (loader: fixture)
from tests.tiny_models import save_tiny_llama


@pytest.fixture(scope="module")
def deep_llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama3"), num_layers=3)


def whole_model_pass(model, dataloader, collector, blocks, *, gradient_dtype, max_samples, desc):
    """The pass before the blockwise one: the whole model on one device,
    decoder layers under activation checkpointing."""
    head = model.get_output_embeddings()
    losses = CausalLMLosses(split_head=head not in collector.modules.values())
    with HooksMixin.disable_hooks():
        return run_gradient_pass(
            model, dataloader, collector, losses, max_samples=max_samples, desc=desc,
            autocast_dtype=resolve_gradient_dtype(gradient_dtype, "cpu"), checkpoint_modules=blocks,
        )


def records(model, loader, statistic, fisher_samples=None):
    modules = {n: m for n, m in model.named_modules() if n.endswith(("proj", "lm_head"))}
    statistics, used = collect_layer_statistics(
        model, loader, modules, statistic=statistic, taylor_weight="auto", fisher_mode="token",
        fisher_samples=fisher_samples, offload_fisher=False, gradient_dtype="float32",
        blocks=list(model.model.layers), desc="test",
    )
    return {name: statistics[module] for name, module in modules.items()}, used


def assert_same_records(ours, reference):
    assert ours.keys() == reference.keys()
    for name, record in reference.items():
        for field, value in vars(record).items():
            mine = getattr(ours[name], field)
            if isinstance(value, list):
                assert len(mine) == len(value), (name, field)
                mine, value = torch.cat(mine), torch.cat(value)
            if isinstance(value, tuple):
                mine, value = torch.tensor(mine), torch.tensor(value)
            if value is None:
                assert mine is None, (name, field)
            elif isinstance(value, float):
                assert mine == pytest.approx(value, rel=1e-12), (name, field)
            else:
                torch.testing.assert_close(mine, value, rtol=1e-12, atol=1e-14, msg=f"{name} {field}")


@pytest.mark.parametrize("statistic", ["token_weights", "matrix", "diagonal"])
def test_blockwise_statistics_equal_the_whole_model_pass(monkeypatch, deep_llama_dir, loader, statistic):
    model = AutoModelForCausalLM.from_pretrained(deep_llama_dir, dtype=torch.float64)
    ours, used = records(model, loader, statistic, fisher_samples=5)
    assert used == 5
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)
    monkeypatch.setattr(gradient_pass, "run_gradient_pass_by_blocks", whole_model_pass)
    reference, _ = records(model, loader, statistic, fisher_samples=5)
    assert_same_records(ours, reference)


def test_groups_of_batches_give_the_same_statistics(monkeypatch, deep_llama_dir, loader):
    """Several batches per onload (a GPU with a CPU-resident model) change the
    order of the work, not the statistics or their sample order."""
    model = AutoModelForCausalLM.from_pretrained(deep_llama_dir, dtype=torch.float64)
    one, _ = records(model, loader, "token_weights")
    monkeypatch.setattr(gradient_pass, "_group_bytes", lambda model, device: 10**9)
    grouped, _ = records(model, loader, "token_weights")
    assert_same_records(grouped, one)


def test_a_group_budget_sets_the_block_trips(deep_llama_dir, loader):
    """Batches whose boundaries fit ``group_bytes`` share each block's two trips."""
    model = AutoModelForCausalLM.from_pretrained(deep_llama_dir, dtype=torch.float32)
    blocks = list(model.model.layers)
    # one batch of 24 tokens: its fp32 input of every block, the last output and one gradient
    per_batch = 24 * model.config.hidden_size * 4 * (len(blocks) + 2)
    trips = []

    @contextlib.contextmanager
    def counting(module):
        trips.append(module)
        with onloaded(module, torch.device("cpu")):
            yield

    modules = {n: m for n, m in model.named_modules() if n.endswith("proj")}
    for budget, groups in [(0, 6), (2 * per_batch, 3), (2 * per_batch - 1, 6), (10**9, 1)]:
        trips.clear()
        run_gradient_pass_by_blocks(
            model, loader, FisherCollector(modules), blocks, onload=counting, group_bytes=budget
        )
        assert sum(m in blocks for m in trips) == 2 * len(blocks) * groups, budget


def test_a_group_of_batches_trims_the_heap_after_each_block(monkeypatch, deep_llama_dir, loader):
    """Within a group, the freed temporaries of each block go back to the OS;
    one batch per group trims once per batch, as before groups existed."""
    from moonshot_plugins.core import blockwise_pass

    model = AutoModelForCausalLM.from_pretrained(deep_llama_dir, dtype=torch.float32)
    blocks = list(model.model.layers)
    modules = {n: m for n, m in model.named_modules() if n.endswith("proj")}
    trims = []
    monkeypatch.setattr(blockwise_pass, "release_freed_memory", lambda: trims.append(1))
    run_gradient_pass_by_blocks(model, loader, FisherCollector(modules), blocks, group_bytes=10**9)
    assert len(trims) == 2 * len(blocks) + 1  # forward and backward of each block, then the group
    trims.clear()
    run_gradient_pass_by_blocks(model, loader, FisherCollector(modules), blocks, group_bytes=0)
    assert len(trims) == 6  # one per batch


def test_the_group_budget_is_a_quarter_of_the_model_within_free_ram():
    assert group_budget(model_bytes=4000, available_bytes=10**9) == 1000
    assert group_budget(model_bytes=10**9, available_bytes=4000) == 1000


def test_groups_fill_a_quarter_of_the_model_when_blocks_travel(monkeypatch, deep_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(deep_llama_dir, dtype=torch.float32)
    # summed here, not with core.module_bytes, which _group_bytes uses
    model_bytes = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    monkeypatch.setattr(gradient_pass.psutil, "virtual_memory", lambda: SimpleNamespace(available=10**12))
    assert gradient_pass._group_bytes(model, torch.device("cuda")) == model_bytes // 4
    assert gradient_pass._group_bytes(model, torch.device("cpu")) == 0  # no trips to save


def test_one_block_is_onloaded_at_a_time(deep_llama_dir, loader):
    model = AutoModelForCausalLM.from_pretrained(deep_llama_dir, dtype=torch.float32)
    blocks = list(model.model.layers)
    ends = model_ends(model, blocks)
    assert [type(m).__name__ for m in ends] == ["Embedding", "LlamaRMSNorm", "LlamaRotaryEmbedding", "Linear"]
    held, log = [], []

    @contextlib.contextmanager
    def counting(module):
        held.append(module)
        log.append(list(held))
        with onloaded(module, torch.device("cpu")):
            yield
        held.remove(module)

    modules = {n: m for n, m in model.named_modules() if n.endswith("proj")}
    run_gradient_pass_by_blocks(model, loader, FisherCollector(modules), blocks, onload=counting)
    assert max(sum(m in blocks for m in at_once) for at_once in log) == 1
    assert all(not any(m in blocks for m in at_once) for at_once in log if any(m in ends for m in at_once))
    # per batch: the start and the tail onload the ends, each block onloads twice
    assert sum(log.count([block]) for block in blocks) == 2 * len(blocks) * 6
    assert not held


def test_offloaded_model_gives_the_same_statistics(deep_llama_dir, loader, tmp_path):
    """A model loaded offloaded to disk (accelerate's device map, converted to
    compressed-tensors offloading as LLM Compressor loads big models): same
    statistics, and the model stays offloaded."""
    from compressed_tensors.offload import load_offloaded_model
    from compressed_tensors.offload.cache import OffloadCache

    plain = AutoModelForCausalLM.from_pretrained(deep_llama_dir, dtype=torch.float64)
    reference, _ = records(plain, loader, "matrix")
    with load_offloaded_model():
        model = AutoModelForCausalLM.from_pretrained(
            deep_llama_dir, dtype=torch.float64, device_map="auto",
            max_memory={"cpu": 40_000}, offload_folder=str(tmp_path),
        )
    offloaded = [m for m in model.modules() if isinstance(m._parameters, OffloadCache)]
    assert any(m._parameters.offload_device == "disk" for m in offloaded)
    ours, _ = records(model, loader, "matrix")
    assert_same_records(ours, reference)
    assert offloaded == [m for m in model.modules() if isinstance(m._parameters, OffloadCache)]


def test_pruned_model_is_the_same_as_with_the_whole_model_pass(monkeypatch, deep_llama_dir, loader):
    modifier = lambda: MoonshotSparseGPTModifier(**COMMON, taylor_weight=0.5)  # noqa: E731
    ours = prune(deep_llama_dir, modifier(), loader)
    monkeypatch.setattr(gradient_pass, "run_gradient_pass_by_blocks", whole_model_pass)
    reference = prune(deep_llama_dir, modifier(), loader)
    for key, weight in reference.items():
        if key.endswith("proj.weight"):
            assert torch.equal(ours[key] != 0, weight != 0), key
        torch.testing.assert_close(ours[key], weight, rtol=1e-4, atol=1e-5)


def test_blocks_that_are_no_chain_are_refused(deep_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(deep_llama_dir, dtype=torch.float32)
    blocks = list(model.model.layers)
    batch = torch.tensor([[5, 6, 7, 8]])
    out = torch.zeros(1, 4, model.config.hidden_size)
    with blocks_bypassed(blocks, out):
        model(batch)  # the right blocks: accepted
    with blocks_bypassed(blocks[::-1], out), pytest.raises(ValueError, match="form a chain"):
        model(batch)  # given in reverse: the model calls them out of that order
