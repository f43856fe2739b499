"""The memory timeline's readings of /proc (Linux)."""

import mmap
import pathlib

import pytest

pytestmark = pytest.mark.skipif(not pathlib.Path("/proc/self/smaps").exists(), reason="reads Linux /proc")


def test_mapping_mib_counts_the_touched_pages_of_a_mapped_file(tmp_path):
    from benchmarks.llm_run import resident_mib
    from benchmarks.memory_timeline import mapping_mib

    path = tmp_path / "weights.bin"
    path.write_bytes(b"\1" * (8 << 20))
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        assert mapping_mib("weights.bin") == 0  # mapped, not yet read
        file_before = resident_mib()["RssFile"]
        assert sum(mapped[i] for i in range(0, len(mapped), 4096)) == 2048
        assert mapping_mib("weights.bin") == 8
        assert resident_mib()["RssFile"] >= file_before + 7
        assert mapping_mib("other.bin") == 0
    assert mapping_mib("weights.bin") == 0  # unmapped


def test_plot_draws_one_panel_per_run(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks.memory_timeline import plot

    row = {"method": "host", "host": "wanda", "sparsity": "2:4", "peak_rss_mib": 30,
           "samples": [(0.0, 10, 5), (0.2, 20, 10)]}
    plot([row, {**row, "method": "moonshot", "pass_start_s": 0.0, "pass_end_s": 0.2}], tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_tensor_bytes_counts_tensors_inside_records():
    import torch

    from benchmarks.memory_timeline import _tensor_bytes

    record = {"fisher": torch.zeros(4, 8), "token_weights": [torch.zeros(3), torch.zeros(5)],
              "token_energies": (1.0, 2.0), "row_factors": None}
    assert _tensor_bytes(record) == 4 * (32 + 3 + 5)


def test_the_sampler_reads_memory_while_its_block_runs():
    import time

    from benchmarks.llm_run import ResidentMemorySampler, resident_mib

    before = resident_mib()["RssAnon"]
    with ResidentMemorySampler(interval_s=0.01) as sampler:
        block = bytearray(64 << 20)  # 64 MiB, written: anonymous
        block[:: 4096] = b"\1" * len(block[:: 4096])
        time.sleep(0.1)
    assert len(sampler.samples) >= 3
    assert [s[0] for s in sampler.samples] == sorted(s[0] for s in sampler.samples)
    assert sampler.peak_anonymous_mib >= before + 60
    assert all(s[2] > 0 for s in sampler.samples)  # the interpreter's own code is file-backed
    del block
