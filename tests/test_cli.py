import os
import signal
import subprocess
import sys

import pytest
from conftest import quantize_argv

from optimum_moeq.cli import main
from optimum_moeq.demo import run_demo


def test_demo_quantizes_saves_and_reloads_exactly(tmp_path, capsys):
    figures = run_demo(avg_bits=2.5, group_size=64, out=str(tmp_path / "out"))
    printed = capsys.readouterr().out
    assert "average bits per expert weight: 2.5000 (16 at 3 bits, 16 at 2 bits)" in printed
    assert figures["average_bits"] == 2.5
    assert figures["bits_per_weight_with_metadata"] == 2.5 + (16 + 2.5) / 64  # float16 scales, b-bit integer zeros
    assert figures["reload_max_abs_diff"] == 0.0
    assert 0.0 < figures["relative_logit_error"] < 1.0
    for name in ("model.safetensors", "allocation.png", "README.md", "eval_results.json", "tokenizer.json"):
        assert (tmp_path / "out" / name).is_file(), name
    assert 0.0 <= figures["bundled_task_accuracy"] <= 1.0
    assert "moeq_tiny_mc" in (tmp_path / "out" / "README.md").read_text()  # the card carries the result
    # a second run into the same folder is refused, not merged into it
    with pytest.raises(FileExistsError, match="exists and is not an empty folder: choose a new folder for --out"):
        run_demo(out=str(tmp_path / "out"))


def test_bad_input_is_one_line_and_a_nonzero_exit(capsys):
    assert main(["demo", "--avg-bits", "7"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "moeq: error: avg_bits=7.0 is outside the bit levels (2, 3): choose avg_bits between 2 and 3."
    )


def test_help_lists_the_demo():
    result = subprocess.run([sys.executable, "-m", "optimum_moeq.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "demo" in result.stdout


def _error(capsys) -> str:
    return capsys.readouterr().err.strip()


def test_overwriting_the_current_directory_is_refused_before_anything_is_touched(
    tiny_mixtral_path, tmp_path, monkeypatch, capsys
):
    (tmp_path / "precious.txt").write_text("keep me")
    monkeypatch.chdir(tmp_path)
    assert main(quantize_argv(str(tiny_mixtral_path), ".", "--overwrite")) == 2
    assert (
        _error(capsys)
        == f"moeq: error: OUT={tmp_path} is the current directory or holds it: --overwrite would delete it."
    )
    assert sorted(os.listdir(tmp_path)) == ["precious.txt"]


@pytest.mark.parametrize("inside", [False, True])
def test_an_out_that_is_or_holds_the_input_model_is_refused(tiny_mixtral_path, tmp_path, capsys, inside):
    """--overwrite would otherwise delete the model being quantized."""
    import shutil

    workspace = tmp_path / "ws"
    model = workspace / "base" if inside else workspace
    shutil.copytree(tiny_mixtral_path, model)
    before = sorted(os.listdir(model))
    assert main(quantize_argv(str(model), str(workspace), "--overwrite")) == 2
    assert (
        _error(capsys) == f"moeq: error: OUT={workspace} is the input MODEL={model} or holds it: choose another OUT."
    )
    assert sorted(os.listdir(model)) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--group-size", "0"], "group_size=0 must be a positive integer"),  # 0 is a value, not "not given"
        (["--attention-bits", "0"], "attention_bits: bits=0 is not supported"),
        (
            ["--method", "gptq", "--group-size", "32", "--dataset", "missing.txt"],
            "dataset='missing.txt' is not a local",
        ),
    ],
)
def test_quantize_option_errors_name_the_value(tiny_mixtral_path, tmp_path, capsys, args, message):
    assert (
        main(
            ["quantize", "--method", "rtn", str(tiny_mixtral_path), str(tmp_path / "out"), "--avg-bits", "2.5", *args]
        )
        == 2
    )
    assert _error(capsys).startswith(f"moeq: error: {message}")
    assert os.listdir(tmp_path) == []  # nothing half-written


def test_outputs_that_cannot_be_written_fail_before_the_checkpoint_is_read(tiny_mixtral_path, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    model = str(tiny_mixtral_path)
    assert (
        main(["quantize", "--method", "rtn", model, str(tmp_path / "a_file"), "--avg-bits", "2.5", "--overwrite"]) == 2
    )
    assert _error(capsys).endswith("a_file exists and is not a folder: choose another OUT.")
    assert main(["quantize", "--method", "rtn", model, str(tmp_path / "a_file" / "out"), "--avg-bits", "2.5"]) == 2
    assert _error(capsys).endswith(f"a_file is a file: OUT={tmp_path / 'a_file' / 'out'} cannot be created below it.")
    assert main(["allocate", model, "--avg-bits", "2.5", "--json", str(tmp_path / "no" / "a.json")]) == 2
    assert (
        _error(capsys)
        == f"moeq: error: cannot write {tmp_path / 'no' / 'a.json'}: folder {tmp_path / 'no'} does not exist."
    )


def test_a_mistyped_folder_and_a_quantized_input_are_named(tiny_mixtral_path, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["allocate", "./tiny-mixtrall", "--avg-bits", "2.5"]) == 2
    assert _error(capsys) == "moeq: error: model './tiny-mixtrall': no such local folder, and not a Hub id (org/name)."
    assert main(["allocate", str(tiny_mixtral_path), "--avg-bits", "2.5", "--reference-model", "../nope"]) == 2
    assert (
        _error(capsys) == "moeq: error: reference_model '../nope': no such local folder, and not a Hub id (org/name)."
    )
    assert (
        main(["quantize", "--method", "rtn", str(tiny_mixtral_path), "q", "--avg-bits", "2.5", "--group-size", "32"])
        == 0
    )
    assert oct((tmp_path / "q").stat().st_mode & 0o777) != oct(0o700)  # an ordinary folder, not mkdtemp's private one
    capsys.readouterr()
    assert main(["quantize", "--method", "rtn", "q", "qq", "--avg-bits", "3", "--group-size", "32"]) == 2
    assert (
        _error(capsys)
        == "moeq: error: q is already quantized (quant_method='moeq'): quantize the original checkpoint instead."
    )


def test_bad_levels_name_the_option_and_verbose_works_after_the_command(tiny_mixtral_path, capsys):
    with pytest.raises(SystemExit):
        main(["allocate", str(tiny_mixtral_path), "--avg-bits", "2.5", "--levels", "2,x"])
    assert "argument --levels: '2,x': give comma-separated bit-widths, e.g. 2,3 or 1,2,3" in _error(capsys)
    with pytest.raises(ValueError, match="avg_bits=7.0 is outside"):  # --verbose: the exception itself
        main(["allocate", str(tiny_mixtral_path), "--avg-bits", "7", "--verbose"])


def test_sigterm_unwinds_so_no_partial_output_is_left(tiny_mixtral_path, tmp_path, monkeypatch):
    import optimum_moeq.commands as commands

    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(commands, "write_model_card", killed)  # the signal lands after the weights are written
    previous = signal.getsignal(signal.SIGTERM)
    args = quantize_argv(str(tiny_mixtral_path), str(tmp_path / "out"))
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert signal.getsignal(signal.SIGTERM) is previous  # the caller's handler is back
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert os.listdir(tmp_path) == []
