"""``reslab train`` / ``reslab eval`` through the CLI: happy path and one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from reslab.cli import main

TINY = ["--set", "data.num_train=32", "--set", "data.num_test=16", "--set", "data.image_size=8",
        "--set", "train.tensorboard=false", "--set", "train.device=cpu", "--batch-size", "16", "--epochs", "1"]


def _train(out: Path, *extra: str) -> int:
    return main(["train", "--model", "cifar_resnet20", "--data", "synthetic", "--out", str(out), "--no-progress",
                 *TINY, *extra])


def test_train_then_eval_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    assert _train(run) == 0
    assert "final test top1" in capsys.readouterr().out
    assert main(["eval", str(run), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res) >= {"top1", "loss"} and 0 <= res["top1"] <= 1 and res["model"] == "cifar_resnet20"
    from reslab.train.checkpoint import last_checkpoint

    ckpt = last_checkpoint(run)[0]  # no validation split: no best.safetensors
    assert main(["eval", str(ckpt), "--json", "--tta", "flip"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["tta"] == "flip" and "top1_single" in res
    assert main(["eval", str(run)]) == 0
    assert "top1" in capsys.readouterr().out
    # Resume a finished run with more epochs.
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2", "--no-progress"]) == 0
    assert "2 epochs" in capsys.readouterr().out


@pytest.mark.parametrize("args, msg", [
    (["--set", "train.epoch=2"], "did you mean 'train.epochs'"),
    (["--set", "optim.lr=0"], "optim.lr must be > 0"),
    (["--set", "model.kwargs.no_such_option=1"], "does not accept the option 'no_such_option'"),
])
def test_bad_input_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str],
                                      msg: str) -> None:
    assert _train(tmp_path / "run", *args) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_cli_refusals(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "x").write_text("keep")
    assert _train(run) == 2 and "--resume" in capsys.readouterr().err
    assert (run / "x").read_text() == "keep"
    assert main(["train", "--out", str(tmp_path / "r2"), "--resume"]) == 2
    assert "cannot resume" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r3")]) == 2
    assert "CONFIG" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "r4")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["train", "--model", "cifar_resnet20", "--data", "cifar10", "--data-dir", str(tmp_path / "none"),
                 "--set", "data.download=false", "--out", str(tmp_path / "r5")]) == 2
    assert "cifar10 not found" in capsys.readouterr().err and not (tmp_path / "r5").exists()
    assert main(["eval", str(tmp_path / "nothing"), "--json"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_off_a_terminal_train_prints_a_line_per_epoch(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Issue 11 item 7: with the bar off (stderr is not a terminal) every epoch still reports on stderr;
    --no-progress silences it."""
    args = ["train", "--model", "cifar_resnet20", "--data", "synthetic", "--epochs", "2",
            "--set", "data.num_train=64", "--set", "data.num_test=32", "--set", "train.batch_size=32"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "epoch 1/2: step 2, train loss" in err and "epoch 2/2: step 4" in err and "test top1" in err
    assert main(args + ["--out", str(tmp_path / "b"), "--no-progress"]) == 0
    assert "epoch 1/2" not in capsys.readouterr().err
