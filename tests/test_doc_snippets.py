"""Every ```python block of the docs runs as written (issue #10).

The blocks of one file run in order in one fresh interpreter, in a temporary working directory, so a later block may
use what an earlier one defined, as a reader going down the page would. Blocks that only show shell commands,
configuration or excerpts are fenced as ```bash, ```yaml or ```text and are not run.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted(
    [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("examples/*.md"), *ROOT.glob("benchmarks/*.md")]
)
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def python_blocks(document: Path) -> list[str]:
    return PYTHON_BLOCK.findall(document.read_text())


DOCUMENTS_WITH_CODE = [document for document in DOCUMENTS if python_blocks(document)]


def test_the_readme_and_the_docs_have_snippets_to_check():
    names = {document.relative_to(ROOT).as_posix() for document in DOCUMENTS_WITH_CODE}
    assert {"README.md", "docs/teachers.md"} <= names


@pytest.mark.slow
@pytest.mark.parametrize("document", DOCUMENTS_WITH_CODE, ids=lambda d: d.relative_to(ROOT).as_posix())
def test_python_snippets_run(document, tmp_path):
    script = tmp_path / "snippets.py"
    script.write_text("\n\n".join(python_blocks(document)))
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    completed = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=900
    )
    assert completed.returncode == 0, f"{document.name}:\n{completed.stderr[-4000:]}"
