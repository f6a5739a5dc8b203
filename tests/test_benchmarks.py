"""The benchmarks run end to end in --smoke mode (CPU, tiny shapes): the scripts work and write
their tables; the figures are not the measurements."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize(
    ("script", "columns"),
    [
        ("expert_kernels.py", "packed GB/s"),
        ("kernel_sweep.py", "best parameters"),
        ("decode.py", "limit tokens/s"),
        ("allocation.py", "vs reading the bytes"),
    ],
)
def test_benchmark_smoke_run_writes_its_table(script, columns, tmp_path):
    out = tmp_path / "table.md"
    extra = ["--profile"] if script == "decode.py" else []
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--smoke", "--out", str(out), *extra],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    table = out.read_text()
    assert columns in table
    assert "not speed" in table or "Tiny smoke shapes" in table
    assert table.count("\n| ") >= 3  # header and at least two rows
    if extra:
        profile = (tmp_path / "decode_profile.md").read_text()
        assert "share of busy time" in profile and profile.count("\n| ") >= 3


def test_calibration_memory_smoke_run_states_its_bound(tmp_path):
    out = tmp_path / "table.md"
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "calibration_memory.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    header, _, row = out.read_text().split("\n")[2:5]
    cells = dict(zip(header.split("|"), row.split("|")))
    assert " one Hessian GiB " in cells and cells[" within "].strip() in ("yes", "NO")
    assert float(cells[" bound GiB "]) >= 1.0  # the stated slack alone
    assert "`python benchmarks/calibration_memory.py --smoke`" in out.read_text()  # the command as run
