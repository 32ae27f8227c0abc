"""The optional dashboards (plumbing/dashboards.py): each trainer's epochs, read back from the TensorBoard
event files and from an offline W&B run, equal its log.jsonl, across a resume; a missing package is
one line before any work. The W&B test runs only where wandb is installed (it is not in
requirements-test.txt: ~20 MB and a service binary)."""
import glob
import json
import os
import struct

import pytest

from plumbing import dashboards
from conftest import TINY, read_log, run_trainer


def tfrecords(path):
    """The records of a TFRecord file (TensorBoard's event files): 8-byte length, 4-byte CRC of the
    length, the data, 4-byte CRC of the data."""
    with open(path, "rb") as f:
        data = f.read()
    pos, out = 0, []
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        out.append(data[pos + 12:pos + 12 + length])
        pos += 12 + length + 4
    assert pos == len(data), "a truncated event file"
    return out


def tensorboard_scalars(folder):
    """{tag: {step: value}} from every event file in `folder` (a resumed run writes a second one)."""
    from tensorboardX.proto.event_pb2 import Event
    scalars = {}
    for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
        for record in tfrecords(path):
            event = Event.FromString(record)
            for v in event.summary.value:
                scalars.setdefault(v.tag, {})[event.step] = v.simple_value
    return scalars


def wandb_history(out):
    """[(run id, {key: value} of each logged step)] from the offline W&B run files in <out>/wandb, read
    as the W&B service writes them: a LevelDB-style log (a 7-byte file header; 32 kB blocks of
    records with a 7-byte header: CRC, length, type full/first/middle/last) of protobuf Records."""
    from wandb.proto.wandb_internal_pb2 import Record
    runs_seen = []
    for path in sorted(glob.glob(os.path.join(out, "wandb", "offline-run-*", "run-*.wandb"))):
        with open(path, "rb") as f:
            data = f.read()
        assert data[:4] == b":W&B"
        pos, buf, run_id, steps = 7, b"", None, []
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (1, 4):  # full, or the last fragment
                record = Record.FromString(buf)
                buf = b""
                if record.WhichOneof("record_type") == "run":
                    run_id = record.run.run_id
                elif record.WhichOneof("record_type") == "history":
                    steps.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        runs_seen.append((run_id, steps))
    return runs_seen


def same(a, b):
    return a == pytest.approx(b, rel=1e-6, nan_ok=True)


@pytest.mark.parametrize("script", sorted(TINY))
def test_tensorboard_events_equal_the_log_across_a_resume(tiny_pipeline_dir, prompt_file, tmp_path, script):
    out = tmp_path / "run"
    argv = [f"--model={tiny_pipeline_dir}", f"--prompts={prompt_file}", *TINY[script], "--epochs=2", f"--out={out}",
            "--tensorboard"]
    run_trainer(script, *argv, "--stop_after=1")
    run_trainer(script, *argv)  # resumes at epoch 1: a second event file
    log = read_log(out)
    scalars = tensorboard_scalars(out / "tensorboard")
    assert len(glob.glob(str(out / "tensorboard" / "events.out.tfevents.*"))) == 2
    assert set(scalars) == set(dashboards.numbers(log[0])) | set(dashboards.numbers(log[1]))
    assert {"reward_mean", "reward_queries", "eval_before", "eval_reward"} <= set(scalars)
    for rec in log:
        for key, value in dashboards.numbers(rec).items():
            assert same(scalars[key][rec["epoch"]], value), (key, rec["epoch"])


def test_a_missing_package_is_one_line_before_any_work(tiny_pipeline_dir, prompt_file, tmp_path, monkeypatch):
    monkeypatch.setitem(dashboards.PACKAGES, "tensorboard", ("no_such_tensorboard_package", "no_such_tensorboard_package==1"))
    with pytest.raises(SystemExit) as e:
        run_trainer("train_ddpo", f"--model={tiny_pipeline_dir}", f"--prompts={prompt_file}", *TINY["train_ddpo"],
                    f"--out={tmp_path / 'run'}", "--tensorboard")
    assert str(e.value) == ("error: --tensorboard needs the no_such_tensorboard_package package, which is not installed; "
                            "`pip install no_such_tensorboard_package==1` (the version tested here), or drop --tensorboard")
    assert not (tmp_path / "run").exists()


def test_changing_the_dashboards_does_not_block_a_resume(tiny_pipeline_dir, prompt_file, tmp_path):
    argv = [f"--model={tiny_pipeline_dir}", f"--prompts={prompt_file}", *TINY["train_ddpo"], "--epochs=2",
            f"--out={tmp_path / 'run'}"]
    run_trainer("train_ddpo", *argv, "--stop_after=1")
    run_trainer("train_ddpo", *argv, "--tensorboard")  # the same run, now also in TensorBoard
    assert list(tensorboard_scalars(tmp_path / "run" / "tensorboard")["reward_mean"]) == [1]


def test_wandb_offline_run_equals_the_log_across_a_resume(tiny_pipeline_dir, prompt_file, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network: the run is written to <out>/wandb
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    argv = [f"--model={tiny_pipeline_dir}", f"--prompts={prompt_file}", *TINY["train_ddpo"], "--epochs=2", f"--out={out}",
            "--wandb_log", "--wandb_project=diffexp-test"]
    run_trainer("train_ddpo", *argv, "--stop_after=1")
    run_trainer("train_ddpo", *argv)
    seen = wandb_history(out)
    run_id = (out / "wandb_id.txt").read_text().strip()
    assert [r for r, _ in seen] == [run_id, run_id]  # the resume continued the same W&B run
    steps = [s for _, history in seen for s in history]
    log = read_log(out)
    assert [s["_step"] for s in steps] == [rec["epoch"] for rec in log]
    for s, rec in zip(steps, log):
        for key, value in dashboards.numbers(rec).items():
            assert same(s[key], value), key


def test_dashboard_options_may_change_on_resume():
    """runs.check_run lets a resume change the dashboards' options (they never change what a run computes)."""
    from plumbing import runs
    assert set(dashboards.OPTIONS) <= set(runs.MAY_CHANGE)
