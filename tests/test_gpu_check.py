"""The GPU check (.ci/gpu-check) without a GPU: its refusal where no CUDA
device is, its preflight naming what is missing, and its install of a
missing package from a wheel placed beside it, with no network."""

import base64
import hashlib
import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / ".ci" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_wheel(folder: Path, name: str) -> Path:
    """A minimal pure-Python wheel of one module, as pip installs them."""
    files = {f"{name}/__init__.py": b"PROBE = 'installed from a wheel'\n",
             f"{name}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
             f"{name}-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
                     f"{len(data)}\n" for path, data in files.items()) + f"{name}-1.0.dist-info/RECORD,,\n"
    wheel = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
        archive.writestr(f"{name}-1.0.dist-info/RECORD", record)
    return wheel


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: the check would run")
def test_the_gpu_check_ends_at_once_without_a_cuda_device(tmp_path):
    result = subprocess.run(["bash", str(ROOT / ".ci" / "gpu-check"), str(tmp_path / "out")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no CUDA device here" in result.stdout and "machine with an NVIDIA GPU" in result.stdout
    assert "no CUDA device here" in (tmp_path / "out" / "preflight.txt").read_text()
    assert not (tmp_path / "out" / "tests.log").exists()  # nothing ran past the preflight


def test_a_missing_package_is_installed_from_a_wheel_placed_beside_it(tmp_path):
    check = gpu_check()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    write_wheel(wheels, "lamb16_probe_pkg")
    still, _ = check.install_missing({"lamb16_probe_pkg": "lamb16_probe_pkg"}, wheels, tmp_path / "site")
    assert still == []
    imported = subprocess.run([sys.executable, "-c", "import lamb16_probe_pkg as p; print(p.PROBE)"],
                              capture_output=True, text=True, env={"PYTHONPATH": str(tmp_path / "site")})
    assert imported.stdout.strip() == "installed from a wheel"


def test_a_missing_required_package_without_a_wheel_is_named_with_the_step_that_fetches_it(tmp_path, monkeypatch,
                                                                                             capsys):
    check = gpu_check()
    monkeypatch.setattr(check, "REQUIRED", dict(check.REQUIRED, lamb16_absent_pkg="lamb16-absent-pkg"))
    status, _ = check.preflight(tmp_path, tmp_path / "no-wheels")
    said = capsys.readouterr().out
    assert status == 2 and "missing, required: lamb16_absent_pkg" in said and "bash .ci/gpu-wheels" in said
    assert "torch" not in said.split("missing")[1]  # what is there is not called missing
