"""Every example script runs to the end (on the CPU) and checks its own result."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = {"mixin_example.py": [], "transformers_example.py": ["transformers"],
            "diffusers_example.py": ["diffusers"]}


@pytest.mark.parametrize("script", sorted(EXAMPLES))
def test_example_runs(script, tmp_path):
    for module in EXAMPLES[script]:
        pytest.importorskip(module)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, os.path.join(REPO, "examples", script), "--device", "cpu"],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "loaded" in result.stdout
