"""The README's Python examples run as written: the front page cannot drift from the code."""
import re
from pathlib import Path

import torch

from test_checkpoints import GREEDYVIG, official_greedyvig_layout, random_state

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch):
    # The example that loads an official GreedyViG file finds one of the official layout (random
    # numbers: the released file cannot be fetched here) in the working directory.
    monkeypatch.chdir(tmp_path)
    torch.save(random_state(official_greedyvig_layout(*GREEDYVIG["greedyvig_s"])),
               "S_GreedyViG_81_1.pth")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 3
    namespace = {}
    for block in blocks:  # one namespace: later examples build on earlier ones, as a reader does
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["out"].shape == (8 * 56 * 56, 48)
    assert isinstance(namespace["maps"], list) and len(namespace["maps"]) == 4
    assert torch.isfinite(namespace["logits"]).all()
    assert namespace["greedyvig"].head.weight.shape == (1000, 768)
