import json
import subprocess
import sys

import pytest

from ot_cfm.cli import main


@pytest.mark.parametrize("command", [[], ["train"], ["sample"]])
def test_help_on_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: ot-cfm" in capsys.readouterr().out


def test_train_then_sample_writes_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--steps", "60", "--batch-size", "64", "--eval-samples", "200", "--width", "32",
                 "--checkpoint-every", "30", "--out", str(out), "--no-progress"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 60 and metrics["coupler"] == "exact"
    for key in ("w2/euler-1", "w2/euler-2", "w2/euler-4", "w2/euler-8", "w2/dopri5", "npe", "w2_floor"):
        assert metrics[key] == metrics[key] and metrics[key] >= 0, key  # finite, not NaN
    assert metrics["nfe/euler-4"] == 4.0
    assert (out / "samples.png").stat().st_size > 10_000 and (out / "checkpoint.pt").exists()
    printed = capsys.readouterr().out
    assert "euler-1" in printed and "dopri5" in printed

    code = main(["sample", str(out / "checkpoint.pt"), "--n", "100", "--solver", "euler", "--steps", "4",
                 "--out", str(tmp_path / "s")])
    assert code == 0
    assert (tmp_path / "s.png").exists() and (tmp_path / "s.pt").exists()


def test_resume_with_other_configuration_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--steps", "10", "--batch-size", "32", "--eval-samples", "100", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert main([*args[:-1], "--lr", "0.5", "--resume", "--no-progress"]) == 2
    assert "another configuration" in capsys.readouterr().err


def test_console_script_is_installed():
    done = subprocess.run([sys.executable, "-m", "ot_cfm.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "train" in done.stdout


def strict_json(path):
    return json.loads(path.read_text(), parse_constant=lambda token: pytest.fail(f"{token} in {path}"))


SMALL = ["--steps", "10", "--batch-size", "32", "--width", "16", "--eval-samples", "100", "--no-progress"]


def test_resuming_a_finished_run_says_so_and_keeps_its_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--out", str(out)]) == 0
    metrics = (out / "metrics.json").read_text()
    first = strict_json(out / "metrics.json")
    assert first["steps_this_call"] == 10 and first["final_loss"] > 0
    capsys.readouterr()
    assert main(["train", *SMALL, "--out", str(out), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert f"the run in {out} had already finished at step 10" in printed and "trained" not in printed
    assert (out / "metrics.json").read_text() == metrics


def test_finished_run_without_valid_metrics_is_evaluated_again(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--out", str(out)]) == 0
    first = strict_json(out / "metrics.json")
    (out / "metrics.json").write_text('{"final_loss": NaN}\n')  # as earlier versions wrote on resume
    assert main(["train", *SMALL, "--out", str(out), "--resume"]) == 0
    again = strict_json(out / "metrics.json")
    assert again["final_loss"] == first["final_loss"] and again["steps"] == 10 and again["steps_this_call"] == 0
    assert again["w2/dopri5"] == first["w2/dopri5"]  # the same evaluation draws
    assert "already finished" in capsys.readouterr().out


def test_cpu_parallelism_is_automatic_by_default():
    from ot_cfm.cli import build_parser
    args = build_parser().parse_args(["train"])
    assert args.workers == "auto" and args.threads is None
    args = build_parser().parse_args(["train", "--workers", "3", "--threads", "2"])
    assert args.workers == 3 and args.threads == 2
    for bad in (["--workers", "-1"], ["--workers", "some"], ["--threads", "0"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["train", *bad])


def test_train_reports_the_parallelism_it_chose(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--coupler", "independent", "--out", str(out)]) == 0
    assert "with 0 workers and 1 torch thread;" in capsys.readouterr().out
    metrics = strict_json(out / "metrics.json")
    assert metrics["workers"] == 0 and metrics["threads"] == 1


def test_sample_from_a_checkpoint_with_a_nan_weight_ends_with_an_error(tmp_path, capsys):
    from ot_cfm.checkpoint import read_checkpoint, write_checkpoint

    out = tmp_path / "run"
    assert main(["train", *SMALL, "--out", str(out)]) == 0
    state = read_checkpoint(out / "checkpoint.pt")
    first = next(iter(state["model"]))
    state["model"][first].view(-1)[0] = float("nan")
    write_checkpoint(out / "checkpoint.pt", state)
    capsys.readouterr()
    assert main(["sample", str(out / "checkpoint.pt"), "--n", "50", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "NaN or inf" in err and "dopri5" in err
    assert not (tmp_path / "s.pt").exists()


def test_sample_max_nfe_is_passed_to_the_adaptive_solver(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["sample", str(out / "checkpoint.pt"), "--n", "50", "--max-nfe", "3", "--out", str(tmp_path / "s")]) == 2
    assert "max_nfe = 3" in capsys.readouterr().err
