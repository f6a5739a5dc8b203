import subprocess
import sys

from optimum_moeq.cli import main
from optimum_moeq.demo import run_demo


def test_demo_quantizes_saves_and_reloads_exactly(tmp_path, capsys):
    figures = run_demo(avg_bits=2.5, group_size=64, out=str(tmp_path / "out"))
    printed = capsys.readouterr().out
    assert "average bits per expert weight: 2.5000 (16 at 3 bits, 16 at 2 bits)" in printed
    assert figures["average_bits"] == 2.5
    assert figures["bits_per_weight_with_metadata"] == 2.5 + 32 / 64
    assert figures["reload_max_abs_diff"] == 0.0
    assert 0.0 < figures["relative_logit_error"] < 1.0
    for name in ("model.safetensors", "allocation.png", "README.md", "eval_results.json", "tokenizer.json"):
        assert (tmp_path / "out" / name).is_file(), name
    assert 0.0 <= figures["bundled_task_accuracy"] <= 1.0
    assert "moeq_tiny_mc" in (tmp_path / "out" / "README.md").read_text()  # the card carries the result


def test_bad_input_is_one_line_and_a_nonzero_exit(capsys):
    assert main(["demo", "--avg-bits", "7"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "moeq: error: avg_bits=7.0 is outside the bit levels (2, 3): choose avg_bits between 2 and 3."
    )


def test_help_lists_the_demo():
    result = subprocess.run([sys.executable, "-m", "optimum_moeq.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "demo" in result.stdout
