"""experiments/gpu_check.py, the GPU check, kept from rotting while no GPU is lent: its tiny mode runs
every step on the CPU and its JSON holds what the full mode reports (tests/test_cuda.py's counts, both
pipelines, every trainer's overhead ratio and memory comparison, DDPO's and PRDP's ratio_dev); the
full mode's trainer options pass each trainer's own checks; the time limits stop, skip and report; the
activations it estimates with are docs/gpu.md's; bad input is one line."""
import json
import math
import os
import time

import pytest
import torch

from plumbing import configurator
from experiments import bench, gpu_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: timings with one torch thread


def configured(*argv):
    return configurator.fresh("experiments.gpu_check", argv)


def finite(v):
    return isinstance(v, (int, float)) and math.isfinite(v)


@pytest.mark.slow  # a whole benchmark: tests/test_cuda.py in a child process, two pipelines, six trainer runs
def test_tiny_mode_runs_every_step_and_writes_every_field(tmp_path, capsys):
    out = tmp_path / "check.json"
    configured("--tiny", f"--json_out={out}", "--repeats=1").main()
    report = json.loads(out.read_text())
    assert report["tiny"] and finite(report["seconds"]) and report["machine"]
    tests = report["cuda_tests"]  # skipped on a CPU, run on a GPU: either way counted, none failed
    assert tests["status"] == "ok" and tests["passed"] + tests["skipped"] >= 6 and tests["failed"] == tests["errors"] == 0
    for model in ("sd15", "sdxl"):
        built = report["pipelines"][model]
        assert built["status"] == "ok" and built["frozen"] == sum(built["params"].values()) and built["lora_per_rank"] > 0
    runs = {(r["model"], r["trainer"]): r for r in report["runs"]}
    assert set(runs) == {(m, t) for m in ("sd15", "sdxl") for t in ("ddpo", "alignprop", "prdp")}
    for (model, trainer), r in runs.items():
        assert r["status"] == "ok", (model, trainer, r["status"])
        assert finite(r["epoch_seconds"]) and finite(r["unet_seconds"]) and r["overhead_ratio"] == pytest.approx(
            r["epoch_seconds"] / r["unet_seconds"])
        mem = r["memory"]  # the comparison: no GPU peak on a CPU, and the tiny shapes' estimate is their weights
        assert "peak_gb" in mem and "peak_over_estimate" in mem and finite(mem["estimate_gb"]) and mem["estimate_gb"] > 0
        assert mem["estimate_gb"] == pytest.approx(mem["weights_gb"])
        if trainer == "alignprop":
            assert r["ratio_dev"] is None
        else:  # one process, fp32 on the CPU: sampling and training compute the same log-probs
            assert finite(r["ratio_dev"]) and r["ratio_dev"] < 1e-5
    text = capsys.readouterr().out
    assert "| sdxl | prdp | ok |" in text and f"wrote {out}" in text


def test_the_full_modes_runs_pass_each_trainers_checks(tiny_pipeline_dir):
    gpu_check = configured()
    configurator.configure(vars(bench), [f"--model={tiny_pipeline_dir}"])
    for model, trainer in gpu_check.RUNS:
        bench.check_trainer(trainer, gpu_check.run_args(model, trainer))  # SystemExit on a bad option


def test_full_mode_estimate_is_gpu_memorys_rule():
    gpu_check = configured()
    counts = dict(frozen=1024 ** 3, lora_per_rank=1000)
    ddpo = gpu_check.estimate("sd15", "ddpo", dict(train_batch_size=4, sample_batch_size=8, lora_rank=4), counts)
    act = gpu_memory.MEASURED_GB["sd15"]
    assert ddpo["weights_gb"] == pytest.approx(2 + 16 * 4000 / 1024 ** 3)
    assert ddpo["estimate_gb"] == pytest.approx(ddpo["weights_gb"] + max(4 * act["unet"], 8 * act["vae_eval"]))
    xl = gpu_check.estimate("sdxl", "alignprop", dict(batch_size=1, lora_rank=4), counts)
    act = gpu_memory.MEASURED_GB["sdxl"]
    assert xl["training_gb"] == pytest.approx(act["xl_unet"] + act["vae"])  # no reward model


def test_time_limits_stop_skip_and_report_failures():
    gpu_check = configured()
    far = time.monotonic() + 100
    r = gpu_check.part("sleeper", 0.3, lambda: time.sleep(5) or {}, far)
    assert r["status"].startswith("out of time") and r["seconds"] < 2
    r = gpu_check.part("late", 100, lambda: {"x": 1}, time.monotonic() + gpu_check.MIN_START - 1)
    assert r["status"].startswith("skipped")

    def fails():
        raise SystemExit("error: --num_steps must be >= 1, got 0")
    assert gpu_check.part("bad", 10, fails, far)["status"] == "failed: SystemExit: error: --num_steps must be >= 1, got 0"
    assert gpu_check.part("good", 10, lambda: {"x": 1}, far)["x"] == 1


def test_measured_activations_are_the_docs_tables():
    """gpu_memory.MEASURED_GB, which the check estimates with, holds docs/gpu.md's activation columns."""
    lines = open(os.path.join(ROOT, "docs", "gpu.md")).read().splitlines()
    # SD 1.5's table: part, parameters, activations; SDXL's adds the three measurements and the line's miss
    for model, described, cells in (("sd15", gpu_memory.SD_PARTS, 3), ("sdxl", gpu_memory.SDXL_PARTS, 5)):
        for part, gb in gpu_memory.MEASURED_GB[model].items():
            row = [l.strip("| ").split(" | ") for l in lines if l.startswith(f"| {described[part]} |")]
            row = [r for r in row if len(r) == cells]
            assert row and row[0][-1] == f"{gb:.2f}", (model, part, row)


@pytest.mark.parametrize("argv, message", [
    (["--models=sd3"], "--models takes sd15, sdxl"),
    (["--trainers=ddpo,ppo"], "--trainers takes ddpo, alignprop, prdp"),
    (["--budget=5"], "--budget must be >= 20"),
    (["--json_out={file}/x.json"], "cannot make its folder"),
])
def test_bad_input_is_one_line(argv, message, tmp_path):
    (tmp_path / "file").write_text("")  # a folder cannot be made inside a file
    with pytest.raises(SystemExit) as e:
        configured("--tiny", *[a.format(file=tmp_path / "file") for a in argv]).main()
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the full check runs here")
def test_without_a_gpu_the_full_check_says_so():
    with pytest.raises(SystemExit, match="no CUDA GPU here"):
        configured().main()
