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


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA device is available")
def test_quickstart_asked_for_cuda_without_a_gpu_says_so(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, os.path.join(REPO, "examples", "quickstart.py"), "--device", "cuda"],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--device cuda: no CUDA device is available here" in result.stderr


def test_quickstart_writes_into_a_directory_it_creates(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    workdir = tmp_path / "not" / "yet"
    result = subprocess.run([sys.executable, os.path.join(REPO, "examples", "quickstart.py"), "--dir", str(workdir)],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every tensor bit-exact with safetensors" in result.stdout
    assert sorted(os.listdir(workdir)) == ["model.flashpack", "model.safetensors"]  # kept: the directory was given
