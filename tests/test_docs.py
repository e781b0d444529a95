"""The README's Python tour and the Colab notebook run as written (so they stay true as the code changes)."""

import json
import os
import re

from conftest import REPO


def _run(code: str, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  exec(compile(code, "<doc>", "exec"), {"__name__": "__doc__"})


def test_readme_python_tour(tmp_path, monkeypatch):
  text = open(os.path.join(REPO, "README.md")).read()
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
  assert blocks, "README has no python example"
  code = "\n".join(blocks).replace("cfg.train.steps = 100", "cfg.train.steps = 20").replace(
      "cfg.data.seq_len, cfg.train.batch_size, cfg.train.steps = 128, 16, 100",
      "cfg.data.seq_len, cfg.train.batch_size, cfg.train.steps = 128, 16, 20")
  assert "steps = 128, 16, 20" in code, "the README example changed: update this test's step override"
  _run(code, tmp_path, monkeypatch)
  assert os.path.isdir(tmp_path / "workdir" / "py" / "checkpoints")


def test_colab_notebook_code_cells(tmp_path, monkeypatch):
  nb = json.load(open(os.path.join(REPO, "colabs", "quickstart.ipynb")))
  cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
  code = "\n".join(c for c in cells if not c.lstrip().startswith(("!", "%", "# !", "# %")))
  code = re.sub(r"^STEPS = \d+", "STEPS = 6", code, flags=re.M)
  assert "STEPS = 6" in code, "the notebook changed: update this test's step override"
  code = code.replace('"/tmp/dlm_quickstart"', repr(str(tmp_path / "nb")))
  _run(code, tmp_path, monkeypatch)
  assert os.path.isdir(tmp_path / "nb" / "checkpoints")
