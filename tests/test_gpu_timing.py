"""The cost benchmark's driver, on the tiny shape on CPU: each method runs in
its own process and is paired with its host's run."""

import json

import pytest

from benchmarks import gpu_timing


@pytest.mark.slow
def test_pairs_each_moonshot_run_with_its_host(tmp_path):
    output = tmp_path / "timing.json"
    gpu_timing.main(["--shape", "tiny", "--samples", "2", "--seq-len", "16",
                     "--methods", "wanda", "moonshot-wanda", "--output", str(output)])
    doc = json.loads(output.read_text())
    host, mine = doc["results"]
    assert (host["method"], mine["method"]) == ("wanda", "moonshot-wanda")
    assert host["seconds_vs_host"] == 1.0 and host["rss_vs_host"] == 1.0
    assert mine["seconds_vs_host"] == pytest.approx(mine["seconds"] / host["seconds"])
    assert mine["taylor_weight"] == gpu_timing.MODIFIER_DEFAULT
    assert doc["samples"] == 2 and doc["code"]


def test_refuses_an_unknown_method(capsys):
    with pytest.raises(SystemExit):
        gpu_timing.main(["--methods", "moonshot-magnitude"])
    assert "moonshot-magnitude" in capsys.readouterr().err
