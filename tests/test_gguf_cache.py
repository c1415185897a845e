"""The embedded model's one-time GGUF conversion under concurrency: ranks and test workers that load
it at once must convert it once and all get the complete folder (a race once left a cache holding
only tokenizer files, which broke every later load)."""

import json
import subprocess
import sys
import threading
import time

import pytest

from icl_scale.models import sources


def test_concurrent_loads_convert_once_and_see_a_complete_folder(tmp_path, monkeypatch):
    calls = []

    def slow_convert(gguf, target):
        calls.append(target)
        time.sleep(0.5)  # long enough for every other caller to arrive while it converts
        tmp = target.parent / (target.name + ".tmpx")
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
        tmp.rename(target)

    monkeypatch.setattr(sources, "_convert", slow_convert)
    target, seen = tmp_path / "smollm2-135m", []
    threads = [threading.Thread(target=lambda: seen.append(sources.convert_gguf_to_cache(None, target)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and seen == [target] * 4
    assert (target / "config.json").exists()


def test_a_folder_without_its_config_is_converted_again(tmp_path, monkeypatch):
    target = tmp_path / "m"
    target.mkdir()
    (target / "tokenizer.json").write_text("{}")  # what the old race left behind
    monkeypatch.setattr(sources, "_convert", lambda g, t: (t / "config.json").write_text("{}"))
    assert sources.convert_gguf_to_cache(None, target) == target
    assert (target / "config.json").exists()


CONVERT = """
import sys
from pathlib import Path
from icl_scale.models.loading import cache_dir, preset
from icl_scale.models.sources import convert_gguf_to_cache, find_gguf
spec = preset("smollm2-135m")
print(convert_gguf_to_cache(find_gguf(spec["package"], spec["gguf_file"]), cache_dir() / "race"))
"""


@pytest.mark.slow
def test_two_processes_convert_the_real_gguf_at_once(tmp_path):
    """The real conversion (about 35 s) started by two processes at the same moment."""
    env = {**__import__("os").environ, "ICL_SCALE_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", CONVERT], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600)[0].strip().splitlines()[-1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs == [str(tmp_path / "race")] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["race", "race.lock"]  # no temp folder left
    files = {p.name for p in (tmp_path / "race").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files, files
    assert json.loads((tmp_path / "race" / "config.json").read_text())["model_type"] == "llama"
