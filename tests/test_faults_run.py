"""Stage 3 under faults: kills during and between checkpoint saves, resumes with other flags, crafted
checkpoints, flags that cannot work, non-finite features. Each run here is a few steps on the pitch stores."""

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from fusionpipe.atomic import atomic_write
from fusionpipe.cli import main
from fusionpipe.errors import FusionpipeError
from fusionpipe.train.checkpoint import load_checkpoint
from fusionpipe.train.loop import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]  # the checkout whose fusionpipe the subprocesses import
@pytest.fixture
def cfg(train_config):
    """conftest's `train_config`, sized for fault injection: 6 steps, a checkpoint every 2."""
    return lambda stores, out, **kw: train_config(stores, out, **{"steps": 6, "eval_every": 2, **kw})


def _log(run: Path, variant: str) -> list[list[str]]:
    with open(run / variant / "log.csv", newline="") as f:
        return list(csv.reader(f))


def _losses(run: Path, variant: str) -> list[float]:
    return [float(row[1]) for row in _log(run, variant)[1:]]


# ---- kills ---------------------------------------------------------------------------------------
# Trains cfg in a subprocess whose torch.save SIGKILLs the process: "mid-write" at the second training
# checkpoint after half its bytes reached the file (or buffer) it was given; "after-step-4" at the first
# save that follows a checkpoint of step 4 (with one file per variant: between two variants' saves).
KILLER = textwrap.dedent("""
    import io, json, os, signal, sys
    import torch
    from fusionpipe.train.loop import TrainConfig, train

    cfg, mode = TrainConfig(**json.loads(sys.argv[1])), sys.argv[2]
    real_save, seen = torch.save, {"checkpoints": 0, "armed": False}

    def find(obj, key):
        if isinstance(obj, dict):
            return ([obj[key]] if key in obj else []) + [x for v in obj.values() for x in find(v, key)]
        return []

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def save(obj, f, *args, **kwargs):
        if seen["armed"]:
            die()
        if mode == "after-step-4" and 4 in find(obj, "step"):
            seen["armed"] = True
        if find(obj, "optimizer"):
            seen["checkpoints"] += 1
            if mode == "mid-write" and seen["checkpoints"] == 2:
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                half = buffer.getvalue()[: len(buffer.getvalue()) // 2]
                if isinstance(f, (str, os.PathLike)):
                    with open(f, "wb") as out:
                        out.write(half)
                        out.flush()
                        os.fsync(out.fileno())
                else:
                    f.write(half)
                die()
        return real_save(obj, f, *args, **kwargs)

    torch.save = save
    train(cfg, progress=False)
""")


def _killed(cfg: TrainConfig, mode: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", KILLER, json.dumps(vars(cfg)), mode], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr[-3000:]


@pytest.mark.slow
def test_kill_in_the_middle_of_a_checkpoint_save_keeps_the_one_before_and_resume_continues(pitch_stores, tmp_path, cfg):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train(cfg(pitch_stores, straight), progress=False)
    _killed(cfg(pitch_stores, killed), "mid-write")  # torn while saving step 4's checkpoint
    assert load_checkpoint(killed / "last.pt")["step"] == 2
    train(cfg(pitch_stores, killed), resume=True, progress=False)
    assert _losses(killed, "hconv-concat") == _losses(straight, "hconv-concat")
    assert [row[0] for row in _log(killed, "hconv-concat")] == ["step", "1", "2", "3", "4", "5", "6"]
    assert not [p for p in killed.rglob("*.tmp")]  # the torn temporary file is gone


@pytest.mark.slow
def test_kill_between_variants_saves_resumes_every_variant_from_one_step(pitch_stores, tmp_path, cfg):
    kw = dict(fusion=["weighted-sum", "hconv"])
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train(cfg(pitch_stores, straight, **kw), progress=False)
    _killed(cfg(pitch_stores, killed, **kw), "after-step-4")
    results = train(cfg(pitch_stores, killed, **kw), resume=True, progress=False)
    for name in ("weighted-sum-concat", "hconv-concat"):
        assert results[name]["steps"] == 6
        assert _losses(killed, name) == _losses(straight, name)  # each trained exactly steps 1..6, once
        assert [row[0] for row in _log(killed, name)][1:] == ["1", "2", "3", "4", "5", "6"]


def test_a_write_that_fails_before_the_rename_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = atomic_write(tmp_path / "results.json", '{"old": 1}')

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, '{"new": 2}')
    assert path.read_text() == '{"old": 1}' and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


# ---- resume --------------------------------------------------------------------------------------
def test_resume_with_another_setting_is_refused_naming_it(pitch_stores, tmp_path, cfg):
    run = tmp_path / "run"
    train(cfg(pitch_stores, run, steps=2), progress=False)
    log = (run / "hconv-concat" / "log.csv").read_text()
    with pytest.raises(FusionpipeError, match=r"--resume: .*lr: 0\.003 -> 0\.001.*only --device, --num-workers, "
                                              r"--steps may change"):
        train(cfg(pitch_stores, run, steps=4, lr=1e-3), resume=True, progress=False)
    with pytest.raises(FusionpipeError, match=r"seed: 0 -> 1; head_options: \{'proj': 16\} -> \{'proj': 8\}"):
        train(cfg(pitch_stores, run, steps=4, head_options={"proj": 8}, seed=1), resume=True, progress=False)
    assert (run / "hconv-concat" / "log.csv").read_text() == log  # nothing trained
    with pytest.raises(FusionpipeError, match=r"--steps \(1\): .* is at step 2 already"):
        train(cfg(pitch_stores, run, steps=1), resume=True, progress=False)
    train(cfg(pitch_stores, run, steps=4, num_workers=0, device="cpu"), resume=True, progress=False)  # more steps: ok
    assert load_checkpoint(run / "last.pt")["step"] == 4


def test_resume_via_the_command_line_refuses_a_changed_flag(pitch_stores, tmp_path, monkeypatch, capsys):
    args = ["train", "--stores", ",".join(pitch_stores["train"]), "--task", "classify", "--steps", "2",
            "--max-frames", "600", "--head-option", "proj=16", "--device", "cpu", "--out", str(tmp_path / "run")]
    assert _cli(args, monkeypatch, capsys)[0] == 0
    code, err = _cli(args + ["--resume", "--lr", "1e-3"], monkeypatch, capsys)
    assert code == 1 and "lr: 0.0001 -> 0.001" in err and "Traceback" not in err


def test_log_keeps_its_header_and_earlier_rows_and_drops_rows_past_the_checkpoint(pitch_stores, tmp_path, cfg):
    run = tmp_path / "run"
    train(cfg(pitch_stores, run, steps=4), progress=False)
    path = run / "hconv-concat" / "log.csv"
    before = _log(run, "hconv-concat")
    with open(path, "a") as f:  # what a kill leaves: rows logged after the checkpoint, the last one torn
        f.write("5,0.5,\r\n6,0.4")
    train(cfg(pitch_stores, run, steps=6), resume=True, progress=False)
    after = _log(run, "hconv-concat")
    assert after[0] == ["step", "loss", "metrics"] and after[:5] == before
    assert [row[0] for row in after[1:]] == ["1", "2", "3", "4", "5", "6"]
    assert [row[0] for row in after[1:] if row[2]] == ["2", "4", "6"]  # dev metrics kept at every evaluation


# ---- checkpoints are data, never code ---------------------------------------------------------------
class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def finished_run(pitch_stores, tmp_path, cfg):
    run = tmp_path / "run"
    train(cfg(pitch_stores, run, steps=2, dev_stores=[]), progress=False)
    return run


@pytest.mark.slow
def test_a_crafted_checkpoint_is_refused_by_evaluate_and_never_run(pitch_stores, finished_run, tmp_path, cfg):
    marker = tmp_path / "pwned"
    best = finished_run / "hconv-concat" / "best.pt"
    torch.save({"model": Payload(marker)}, best)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "fusionpipe", "evaluate", str(finished_run), "--stores",
                           ",".join(pitch_stores["dev"]), "--device", "cpu"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.startswith("error: ") and str(best) in done.stderr and "Traceback" not in done.stderr
    assert not marker.exists()
    from fusionpipe.ablate.report import interface_params
    from fusionpipe.train.rundir import RunDir

    with pytest.raises(FusionpipeError, match="not a checkpoint fusionpipe can read"):
        interface_params(RunDir(finished_run), "hconv-concat")
    torch.save({"step": Payload(marker)}, finished_run / "last.pt")
    with pytest.raises(FusionpipeError, match=str(finished_run / "last.pt")):
        train(cfg(pitch_stores, finished_run, steps=4, dev_stores=[]), resume=True, progress=False)
    assert not marker.exists()


def test_a_torn_checkpoint_is_an_error_naming_it(finished_run):
    best = finished_run / "hconv-concat" / "best.pt"
    best.write_bytes(b"")
    with pytest.raises(FusionpipeError, match=f"{best} is not a checkpoint fusionpipe can read"):
        load_checkpoint(best)


# ---- every flag is checked before the first step ---------------------------------------------------
def _cli(args, monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["fusionpipe", *args])
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code or 0, capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (lambda s: ["--dev-stores", ",".join(s["dev"][::-1])], "--dev-stores holds the upstreams of --stores in another "
                                                          "order (toy-whisper, toy-wavlm)"),
    (lambda s: ["--dev-stores", s["dev"][0]], "--dev-stores names 1 store(s) and --stores 2"),
    (lambda s: ["--dev-stores", f"{s['dev'][0]},{s['dev'][0]}"], "--dev-stores store 2 ("),
    (lambda s: ["--dev-stores", ",".join(s["dev"]), "--select", "nosuch"], "--select (select='nosuch'): not a dev "
                                                                          "metric of task classify"),
    (lambda s: ["--dev-stores", ",".join(s["dev"]), "--task", "verify"], "give --trials FILE"),
    (lambda s: ["--dev-stores", ",".join(s["dev"]), "--steps", "0"], "--steps (steps=0): must be a whole number >= 1"),
    (lambda s: ["--steps", "-5"], "--steps (steps=-5)"),
    (lambda s: ["--eval-every", "0"], "--eval-every (eval_every=0)"),
    (lambda s: ["--lr", "-0.1"], "--lr (lr=-0.1): must be a positive number"),
    (lambda s: ["--grad-clip", "0"], "--grad-clip (grad_clip=0.0)"),
    (lambda s: ["--max-frames", "0"], "--max-frames (max_frames=0)"),
    (lambda s: ["--optimizer", "sgd"], "--optimizer (optimizer='sgd'): choose adam or adamw"),
    (lambda s: ["--head-option", "hidden=8"], "--head-option (head_options={'hidden': 8}): hidden: unknown to the "
                                             "classify head, which takes proj"),
    (lambda s: ["--crop-seconds", "8,2"], "--crop-seconds"),
    (lambda s: ["--head-option", "proj=-5"], "proj: expected a whole number from 1 to"),
    (lambda s: ["--head-option", "proj=0"], "proj: expected a whole number from 1 to"),
    (lambda s: ["--head-option", "proj=1.5"], "proj: expected a whole number from 1 to"),
    (lambda s: ["--head-option", "proj=1e9"], "proj: expected a whole number from 1 to"),
    (lambda s: ["--task", "asr", "--head-option", "hidden=1000000"], "--head-option {'hidden': 1000000}: the asr "
                                                                      "head would have"),
    (lambda s: ["--interface-option", "stride=1"], "stride: expected a whole number from 2 to 64"),
    (lambda s: ["--interface-option", "normalize=maybe"], "normalize: expected true or false"),
    (lambda s: ["--seed", str(2**64)], "--seed (seed=18446744073709551616): must be a whole number from 0"),
    (lambda s: ["--seeds", f"0,{2**64}"], "--seeds (seeds=[0, 18446744073709551616]): each seed"),
    (lambda s: ["--num-workers", "-3"], "--num-workers (num_workers=-3): must be a whole number from 0"),
], ids=["dev-order", "dev-count", "dev-model", "select", "verify-trials", "steps-0", "steps-negative",
        "eval-every", "lr", "grad-clip", "max-frames", "optimizer", "head", "crop", "head-negative", "head-zero",
        "head-fraction", "head-1e9", "head-too-big", "stride-1", "normalize-text", "seed-65-bits", "seeds-65-bits",
        "num-workers-negative"])
def test_a_flag_that_cannot_work_is_an_error_before_anything_runs(extra, message, pitch_stores, tmp_path,
                                                                   monkeypatch, capsys):
    out = tmp_path / "run"
    args = ["train", "--stores", ",".join(pitch_stores["train"]), "--task", "classify", "--steps", "2",
            "--max-frames", "600", "--device", "cpu", "--out", str(out)]
    code, err = _cli(args + extra(pitch_stores), monkeypatch, capsys)
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: ") and message in err, err
    assert not out.exists()  # refused before anything was read, trained or written


def test_evaluate_refuses_stores_of_fewer_or_other_upstreams_than_the_run(pitch_stores, finished_run, monkeypatch,
                                                                         capsys):
    for stores, message in ((pitch_stores["dev"][:1], "--stores names 1 store(s) and the run's --stores 2"),
                            (pitch_stores["dev"][::-1], "--stores holds the upstreams of the run's --stores in "
                                                        "another order")):
        code, err = _cli(["evaluate", str(finished_run), "--stores", ",".join(stores), "--device", "cpu"],
                         monkeypatch, capsys)
        assert code == 1 and message in err and "Traceback" not in err, err


# ---- non-finite features ---------------------------------------------------------------------------
@pytest.mark.parametrize("eval_every", [1, 24])
def test_a_non_finite_loss_stops_naming_variant_step_and_utterances(pitch_stores, tmp_path, cfg, eval_every):
    """Every step read back (eval_every 1), or the losses read together later (24): the same step is named and
    nothing of it is logged or saved."""
    stores = [str(shutil.copytree(s, tmp_path / Path(s).name)) for s in pitch_stores["train"]]
    group = zarr.open_group(stores[0], mode="r+")
    ids = [str(i) for i in group["index/ids"][:]]
    row = ids.index("train-05")
    start, length = int(group["index/offsets"][row]), int(group["index/lengths"][row])
    group["hidden"][start:start + length] = np.nan
    run = tmp_path / "run"
    with pytest.raises(FusionpipeError) as e:
        train(cfg({"train": stores, "dev": []}, run, steps=24, eval_every=eval_every), progress=False)
    msg = str(e.value)
    assert msg.startswith("variant hconv-concat: the training loss is nan at step ") and "train-05" in msg
    step = int(msg.split(" at step ")[1].split(",")[0])
    if step > 1 and eval_every == 1:  # the checkpoint before it is intact and finite
        state = load_checkpoint(run / "last.pt")
        assert state["step"] == step - 1 and f"{run / 'last.pt'} still holds step {step - 1}" in msg
        assert all(torch.isfinite(t).all() for t in state["variants"]["hconv-concat"]["model"].values())
    if eval_every == 24:
        assert "no checkpoint was written yet" in msg and not (run / "last.pt").exists()
    assert _log(run, "hconv-concat")[-1][0] == (str(step - 1) if step > 1 else "step")  # nothing of that step


def test_without_a_dev_set_best_pt_follows_a_resumed_run(pitch_stores, finished_run, cfg):
    train(cfg(pitch_stores, finished_run, steps=4, dev_stores=[]), resume=True, progress=False)
    best = load_checkpoint(finished_run / "hconv-concat" / "best.pt")["model"]
    last = load_checkpoint(finished_run / "last.pt")["variants"]["hconv-concat"]["model"]
    assert all(torch.equal(best[k], last[k]) for k in last)


def test_resume_of_a_run_with_per_variant_checkpoints_is_refused(pitch_stores, finished_run, cfg):
    """Runs of older versions kept one last.pt per variant, possibly at different steps."""
    shutil.copy(finished_run / "last.pt", finished_run / "hconv-concat" / "last.pt")
    with pytest.raises(FusionpipeError, match="per-variant checkpoints of an older fusionpipe"):
        train(cfg(pitch_stores, finished_run, steps=4, dev_stores=[]), resume=True, progress=False)


# ---- a run directory is not tied to its path ---------------------------------------------------------
@pytest.mark.slow
def test_a_moved_run_directory_resumes_and_evaluates(pitch_stores, tmp_path, cfg):
    """`out` is where the run is, not a setting: a copied or moved run resumes (it was refused with
    out: 'runs/a' -> 'runs/b') and its loss curve continues as if it had never moved."""
    from fusionpipe.train.evaluation import evaluate

    straight = tmp_path / "straight"
    train(cfg(pitch_stores, straight, steps=4), progress=False)
    a, b = tmp_path / "a", tmp_path / "elsewhere" / "b"
    train(cfg(pitch_stores, a, steps=2), progress=False)
    b.parent.mkdir()
    shutil.move(a, b)
    train(cfg(pitch_stores, b, steps=4), resume=True, progress=False)
    assert _losses(b, "hconv-concat") == _losses(straight, "hconv-concat")
    assert json.loads((b / "config.json").read_text())["out"] == str(b)
    assert "hconv-concat" in evaluate(b, pitch_stores["dev"])


def test_an_edited_config_or_checkpoint_is_refused_naming_the_file(pitch_stores, tmp_path, cfg):
    from fusionpipe.train.checkpoint import save_checkpoint
    from fusionpipe.train.evaluation import evaluate

    run = tmp_path / "run"
    train(cfg(pitch_stores, run, steps=2), progress=False)
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**saved, "head_options": {"proj": 1e12}}))
    with pytest.raises(FusionpipeError, match=r"config\.json: --head-option .*proj: expected a whole number"):
        evaluate(run, pitch_stores["dev"])
    (run / "config.json").write_text(json.dumps(saved))
    state = load_checkpoint(run / "last.pt")
    save_checkpoint({**state, "step": -5}, run / "last.pt")
    with pytest.raises(FusionpipeError, match=r"last\.pt does not fit this run .*step -5"):
        train(cfg(pitch_stores, run, steps=4), resume=True, progress=False)
