"""docs/tutorial.md runs as written: its python blocks, in order, in one namespace (asserts included)."""
import re
from pathlib import Path

import torch

import retrofit

ROOT = Path(__file__).resolve().parents[1]


def test_tutorial_runs(monkeypatch, tmp_path):
    text = (ROOT / "docs" / "tutorial.md").read_text()
    blocks = re.findall(r"```python\n(.*?)\n```", text, flags=re.S)
    assert len(blocks) >= 8, "the tutorial lost its examples"
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "tutorial"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/tutorial.md block {i + 1}", "exec"), namespace)
    # the tutorial's own asserts checked each step; the names it promises exist and are what it says
    assert isinstance(namespace["se_gm"], torch.fx.GraphModule)
    assert type(namespace["plain"]) is namespace["Net"]
    assert [b.path for b in retrofit.get_info(namespace["se_inet"]).blocks] == ["1.se", "2.se"]
