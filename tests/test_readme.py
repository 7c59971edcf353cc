"""The README's Python examples run as written: the front page cannot drift from the code."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 3
    namespace = {}
    for block in blocks:  # one namespace: later examples build on earlier ones, as a reader does
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["out"].shape == (8 * 56 * 56, 48)
    assert isinstance(namespace["maps"], list) and len(namespace["maps"]) == 4
    assert torch.isfinite(namespace["logits"]).all()
