"""The Python package around the library: importing, and what happens without a build."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import flashpack_ops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_registers_the_ops():
    assert hasattr(torch.ops.flashpack, "load")
    assert os.path.exists(flashpack_ops.library_path())


def test_missing_library_says_how_to_build(tmp_path):
    # A copy of the package without its compiled library, imported in a fresh process.
    package = os.path.dirname(flashpack_ops.__file__)
    shutil.copytree(package, tmp_path / "flashpack_ops",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    result = subprocess.run([sys.executable, "-c", "import flashpack_ops"], cwd=tmp_path,
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert "flashpack_ops/_C*.so) was not found" in result.stderr
    assert "pip install --no-build-isolation ." in result.stderr


def test_unloadable_library_says_how_to_build(tmp_path):
    # A library the loader refuses (built against another torch: undefined symbols) fails the
    # import with the reason and the command that builds it again.
    package = os.path.dirname(flashpack_ops.__file__)
    shutil.copytree(package, tmp_path / "flashpack_ops",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    (tmp_path / "flashpack_ops" / "_C.abi3.so").write_bytes(b"not a shared library")
    result = subprocess.run([sys.executable, "-c", "import flashpack_ops"], cwd=tmp_path,
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()
    assert any(line.startswith("ImportError: flashpack_ops: the compiled library") for line in last)
    assert "could not be loaded" in result.stderr
    assert f"torch {torch.__version__}" in result.stderr
    assert "pip install --no-build-isolation --force-reinstall --no-deps ." in result.stderr


def test_the_library_holds_no_python():
    # One build serves every CPython and LibTorch-only programs: no libpython dependency.
    if shutil.which("ldd") is None:
        pytest.skip("ldd is not installed")
    out = subprocess.run(["ldd", flashpack_ops.library_path()], capture_output=True, text=True).stdout
    assert "libpython" not in out
    assert "libtorch_python" not in out


def test_reference_names_are_all_there():
    flashpack = pytest.importorskip("flashpack")
    missing = [n for n in flashpack.__all__ if not hasattr(flashpack_ops, n)]
    assert missing == []
    from flashpack import deserialization

    from flashpack_ops import deserialization as ours
    public = [n for n in ("read_flashpack_file", "iterate_from_flash_tensor", "FlashTensorStorage",
                          "read_flashpack_file_distributed", "assign_from_file", "revert_from_file")
              if hasattr(deserialization, n)]
    assert [n for n in public if not hasattr(ours, n)] == []
    assert flashpack_ops.version == flashpack_ops.__version__
    # Reachable as attributes, as in the reference, without importing the submodules.
    code = ("import flashpack_ops as flashpack\n"
            "assert flashpack.deserialization.read_flashpack_file and flashpack.serialization.pack_to_file\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])))
    assert result.returncode == 0, result.stderr


def test_reference_integration_modules_import_under_our_name():
    # `from flashpack.integrations.X import Y` becomes `from flashpack_ops.integrations.X import Y`.
    import importlib

    for module, names in (("integrations", ["patch_integrations"]),
                          ("integrations.patch", ["patch_integrations"]),
                          ("integrations.transformers", ["FlashPackTransformersModelMixin",
                                                         "patch_transformers_auto_model"]),
                          ("integrations.diffusers", ["FlashPackDiffusersModelMixin", "FlashPackDiffusionPipeline",
                                                      "patch_diffusers_auto_model"])):
        if module.endswith(("transformers", "diffusers")):
            pytest.importorskip(module.rsplit(".", 1)[1])
        ours = importlib.import_module(f"flashpack_ops.{module}")
        assert [n for n in names if not hasattr(ours, n)] == [], module
    assert importlib.import_module("flashpack_ops.integrations.patch").patch_integrations is \
        flashpack_ops.patch_integrations


def _docstring_problems(name, obj):
    """What the docstring of ``obj`` lacks: an Example, or an Args entry for a public parameter."""
    import inspect
    import re

    problems = []
    doc = inspect.getdoc(obj) or ""
    if "Example:" not in doc:
        problems.append(f"{name}: no Example")
    params = [p for p in inspect.signature(obj).parameters
              if not p.startswith("_") and p not in ("self", "cls", "args", "kwargs")]
    args = re.search(r"^Args:\n((?:    .*\n?|\n)*)", doc, re.M)
    documented = set()
    for line in (args.group(1) if args else "").splitlines():
        # An entry, or a group of them, which may go on over the next, deeper lines.
        head = re.match(r"    (\*{0,2}\w+(?:, \*{0,2}\w+)*)(:|,$)", line)
        if head and not line.startswith("     "):
            group = [head.group(1) + head.group(2).rstrip(":")]
            following = args.group(1).splitlines()
            for more in following[following.index(line) + 1:]:
                tail = re.match(r"        (\w+(?:, \w+)*)(:|,$)", more)
                if not group[-1].endswith(",") or tail is None:
                    break
                group.append(tail.group(1) + tail.group(2).rstrip(":"))
            documented.update(n.strip().lstrip("*") for n in ",".join(group).split(",") if n.strip())
    missing = [p for p in params if p not in documented]
    if missing:
        problems.append(f"{name}: Args lacks {missing}")
    return problems


def test_public_api_docstrings_follow_one_style():
    # Args (every public parameter, alone or in a group) / Returns / Raises / Example, as
    # safetensors documents its API; names starting with "_" are internal.
    problems = []
    for name in flashpack_ops.__all__:
        obj = getattr(flashpack_ops, name)
        if callable(obj):
            problems += _docstring_problems(name, obj)
    assert problems == []


def test_mixin_command_and_integration_docstrings_follow_the_same_style():
    # The methods a model gains, the functions behind the command line, and the integrations'
    # functions: public API as much as the top-level names.
    import importlib.util

    from flashpack_ops import commands

    public = {"FlashPackMixin.from_flashpack": flashpack_ops.FlashPackMixin.from_flashpack,
              "FlashPackMixin.save_flashpack": flashpack_ops.FlashPackMixin.save_flashpack,
              "commands.convert_to_flashpack": commands.convert_to_flashpack,
              "commands.revert_from_flashpack": commands.revert_from_flashpack}
    if importlib.util.find_spec("transformers") is not None:
        from flashpack_ops.integrations import transformers

        public.update({f"transformers.{n}": getattr(transformers, n)
                       for n in ("from_pretrained_flashpack", "save_pretrained_flashpack")})
    if importlib.util.find_spec("diffusers") is not None:
        from flashpack_ops.integrations import diffusers

        public.update({f"diffusers.{n}": getattr(diffusers, n)
                       for n in ("from_pretrained_flashpack", "save_pretrained_flashpack", "load_pipeline_flashpack",
                                 "save_pipeline_flashpack")})
    problems = []
    for name, obj in public.items():
        problems += _docstring_problems(name, obj)
    assert problems == []


def test_source_distribution_holds_what_a_build_needs(tmp_path):
    # From a copy of the sources, as a fresh checkout would be: the sdist must build on its own
    # (every header, the CUDA sources whatever machine made it) and carry the LibTorch example.
    import tarfile

    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".*", "build", "dist", "*.egg-info", "*.so", "__pycache__"))
    result = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")],
                            cwd=source, capture_output=True, text=True, env={**os.environ, "FLASHPACK_NO_CUDA": "1"})
    assert result.returncode == 0, result.stderr
    (sdist,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        packed = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = ["setup.py", "pyproject.toml", "README.md", "tests/conftest.py"]
    for folder in ("csrc", "torchscript"):
        for root, _, files in os.walk(source / folder):
            needed += [os.path.relpath(os.path.join(root, f), source) for f in files]
    assert any(name.startswith("csrc/cuda/") for name in needed)
    assert [name for name in needed if name not in packed] == []
    # The license is declared in the form this setuptools takes, with no deprecation (the old
    # form stops building in 2027), and the LICENSE file travels with it.
    assert "license" not in result.stderr.lower(), result.stderr
    with tarfile.open(sdist) as tar:
        info = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("/PKG-INFO"))).read().decode()
    assert "License-Expression: MIT" in info or "License: MIT" in info, info
    assert "LICENSE" in packed


def test_public_type_hints_resolve_in_a_fresh_process():
    # typing.get_type_hints (pydantic, typer, sphinx-autodoc-typehints) evaluates an annotation
    # in the namespace of the function's own module: a forward reference inside a shared alias
    # must resolve there too. A fresh process, the mixin's methods first: once evaluated in
    # ops.py's namespace, a forward reference is cached and the failure no longer shows.
    code = """
import typing, warnings
warnings.simplefilter("ignore")
import flashpack_ops
from flashpack_ops import commands
public = [flashpack_ops.FlashPackMixin.from_flashpack, flashpack_ops.FlashPackMixin.save_flashpack,
          commands.convert_to_flashpack, commands.revert_from_flashpack, flashpack_ops.safe_open.__init__]
public += [getattr(flashpack_ops, n) for n in flashpack_ops.__all__
           if callable(getattr(flashpack_ops, n)) and not isinstance(getattr(flashpack_ops, n), type)]
failed = []
for f in public:
    try:
        typing.get_type_hints(f)
    except Exception as e:
        failed.append(f"{f.__qualname__}: {type(e).__name__}: {e}")
assert not failed, failed
# Net.from_flashpack(...) is a Net to a type checker, not a bare FlashPackMixin.
assert isinstance(typing.get_type_hints(flashpack_ops.FlashPackMixin.from_flashpack)["return"], typing.TypeVar)
# Destinations are fspath'd: a pathlib.Path is as good as a str.
assert "PathLike" in str(typing.get_type_hints(commands.convert_to_flashpack)["destination_path"])
assert "PathLike" in str(typing.get_type_hints(commands.revert_from_flashpack)["destination_path"])
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])))
    assert result.returncode == 0, result.stderr


def test_a_library_with_its_own_libstdcxx_gives_whole_error_messages(tmp_path):
    # Some compilers link libstdc++ into the library statically; its copy shares no locale with
    # the one torch loaded, and a number formatted through its streams came out empty or
    # crashed. Every message of test_format_errors.py must come out whole from such a build too.
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed")
    (tmp_path / "probe.cpp").write_text("int probe() { return 0; }\n")
    if subprocess.run(["g++", "-shared", "-fPIC", "-static-libstdc++", "probe.cpp", "-o", "probe.so"],
                      cwd=tmp_path, capture_output=True).returncode != 0:
        pytest.skip("g++ cannot link libstdc++ statically here")
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".*", "build", "dist", "*.egg-info", "*.so", "__pycache__", "tests", "docs", "benchmarks", "examples", "fuzz"))
    (source / "tests").mkdir()
    for name in ("conftest.py", "test_format_errors.py"):
        shutil.copy(os.path.join(REPO, "tests", name), source / "tests" / name)
    env = {**os.environ, "FLASHPACK_NO_CUDA": "1", "LDFLAGS": "-static-libstdc++",
           "MAX_JOBS": str(os.cpu_count() or 1)}
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=source,
                           capture_output=True, text=True, env=env)
    assert build.returncode == 0, build.stderr[-3000:]
    (library,) = (source / "flashpack_ops").glob("_C*.so")
    if shutil.which("ldd") is not None:
        assert "libstdc++" not in subprocess.run(["ldd", str(library)], capture_output=True, text=True).stdout
    env = {**os.environ, "PYTHONPATH": str(source)}
    where = subprocess.run([sys.executable, "-c", "import flashpack_ops; print(flashpack_ops.library_path())"],
                           cwd=source, capture_output=True, text=True, env=env)
    assert where.stdout.strip() == str(library), where.stdout + where.stderr
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_format_errors.py"],
                            cwd=source, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]  # "167 passed, 2 warnings in 6.9s"
    assert " passed" in last and "failed" not in last and "error" not in last, last
