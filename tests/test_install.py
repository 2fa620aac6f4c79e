"""The package stands alone: installed from a wheel (non-editable) into a fresh venv, the
packaged data (calibration files, measurements, the default plan) is found from any directory."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_pip_install_then_validate_from_another_directory(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    bin_dir = env_dir / ("Scripts" if sys.platform == "win32" else "bin")
    install = subprocess.run(
        [str(bin_dir / "pip"), "install", "-q", str(ROOT)], capture_output=True, text=True
    )
    assert install.returncode == 0, install.stderr
    assert "Deprecat" not in install.stderr  # license as an SPDX string
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cli = str(bin_dir / "clustersim")
    result = subprocess.run(
        [cli, "validate", "--set-name", "dense", "--json"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    check = subprocess.run([cli, "check", "--static"], cwd=elsewhere, capture_output=True)
    assert check.returncode == 0, check.stderr
