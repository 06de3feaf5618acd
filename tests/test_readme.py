"""What the README promises: its Python example runs as a script (decoder processes are
spawned, so it needs its ``if __name__ == "__main__":`` guard), and every exit code of the
command line is documented."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import distinct_image, write_images

from lookalike import errors

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


@pytest.mark.slow  # a real index (default preset) with decoder processes: ~10 s
def test_the_python_example_runs_as_a_script(tmp_path):
    (example,) = python_blocks(README.read_text())
    assert 'if __name__ == "__main__":' in example
    photos = write_images(tmp_path / "photos", 6, side=256)
    distinct_image(3, side=256).save(tmp_path / "query.jpg", quality=92)
    (tmp_path / "example.py").write_text(example)
    done = subprocess.run(
        [sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "6 images added, 0 failed"
    rank, score, path = lines[1].split()
    assert (rank, Path(path)) == ("1", photos[3].resolve()) and float(score) > 0.9
    assert len(lines) == 6  # k=5 hits of the first query


def test_every_exit_code_is_documented():
    text = README.read_text()
    table = dict(re.findall(r"^\| (\d+) \| (.+) \|$", text, flags=re.MULTILINE))
    kinds = [c for c in vars(errors).values() if isinstance(c, type) and hasattr(c, "exit_code")]
    codes = {0, 130} | {c.exit_code for c in kinds}
    assert codes == {0, 1, 2, 3, 4, 5, 6, 130}
    assert set(map(int, table)) == codes
    assert "storage" in table["6"] and "interrupted" in table["130"]
    assert "`.venv/bin/lookalike`" in text
