"""The whole quickstart job (many CPU minutes): `pytest -m slow tests/test_quickstart.py`."""
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["gpt", "maskgit"])
def test_quickstart_end_to_end(tmp_path, variant):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)  # the quickstart runs on the machine's real devices
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "vqgen.main", f"--config={ROOT}/configs/quickstart.py:{variant}",
                    f"--workdir={tmp_path}"], check=True, env=env, cwd=ROOT)
    minutes = (time.time() - t0) / 60
    report = json.loads((tmp_path / "report.json").read_text())
    print(json.dumps({"minutes": minutes, **report}, indent=1))
    assert report["tokenizer"]["psnr"] >= 20.0
    assert report["tokenizer"]["codebook_usage"] >= 0.5
    assert report["samples"]["judge_test_accuracy"] >= 0.97
    assert report["samples"]["judge_accuracy"] >= 0.9
    assert (tmp_path / "samples" / "grid.png").exists()
