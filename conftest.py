import pytest

from tests.tiny_models import save_tiny_llama


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama + word-level tokenizer saved to disk (no downloads)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))
