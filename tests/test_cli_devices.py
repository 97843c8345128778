"""Every command refuses a device this machine does not have with one line and exit 2, before loading."""

import pytest
import torch
from conftest import run_cli

COMMANDS = {
    "train": ["train", "--steps", "1"],
    "generate": ["generate", "--prompt", "hi"],
    "chat": ["chat"],
    "eval": ["eval", "--data", "{data}"],
    "inspect": ["inspect", "--prompt", "hi", "--out", "{out}"],
    "score": ["score", "--data", "{data}", "--out", "{out}/s.jsonl"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("device,needle", [
    ("tpu", "--device tpu: not a device"),
    ("cuda", "--device cuda: CUDA is not available on this machine"),
])
def test_unavailable_device_is_one_line(command, device, needle, tmp_path):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is valid here")
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    args = [a.format(data=data, out=tmp_path) for a in COMMANDS[command]]
    r = run_cli(*args, "--device", device, env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("gemmaforge: error: ") and needle in lines[-1], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
