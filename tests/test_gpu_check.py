"""experiments/gpu_check.py, the GPU check, kept from rotting while no GPU is lent: its tiny mode runs
every step on the CPU and its JSON holds what the full mode reports (tests/test_cuda.py's counts, the
three pipelines, every trainer's overhead ratio and memory comparison, DDPO's and PRDP's ratio_dev); the
full mode's trainer options pass each trainer's own checks; SD 3.5's T5 tokenizer is T5's size and its
pipeline builds without T5 too; the time limits stop, skip and report; the activations it estimates
with are docs/gpu.md's; bad input is one line."""
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


@pytest.mark.slow  # a whole benchmark: tests/test_cuda.py in a child process, three pipelines, nine trainer runs
def test_tiny_mode_runs_every_step_and_writes_every_field(tmp_path, capsys):
    out = tmp_path / "check.json"
    configured("--tiny", f"--json_out={out}", "--repeats=1").main()
    report = json.loads(out.read_text())
    assert report["tiny"] and finite(report["seconds"]) and report["machine"]
    tests = report["cuda_tests"]  # skipped on a CPU, run on a GPU: either way counted, none failed
    assert tests["status"] == "ok" and tests["passed"] + tests["skipped"] >= 6 and tests["failed"] == tests["errors"] == 0
    assert list(report["pipelines"]) == ["sd15", "sd3", "sdxl"]  # the default order: SD 1.5 first
    for model, built in report["pipelines"].items():
        assert built["status"] == "ok" and built["frozen"] == sum(built["params"].values()) and built["lora_per_rank"] > 0
        assert (built["params"]["t5"] > 0) == (model == "sd3")  # SD 3.5's T5 encoder is built
    runs = {(r["model"], r["trainer"]): r for r in report["runs"]}
    assert set(runs) == {(m, t) for m in ("sd15", "sd3", "sdxl") for t in ("ddpo", "alignprop", "prdp")}
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
    # SD 3.5's runs: the transformer's calls carry T5's 256 tokens after the CLIPs', the flow SDE's noise
    # level is Flow-GRPO's, and DDPO's KL term is on
    assert all(c["emb"][1] > 256 for r in runs.values() if r["model"] == "sd3" for c in r["unet_calls"])
    assert "--eta=0.7" in runs["sd3", "prdp"]["args"] and all("kl_ref" in rec for rec in runs["sd3", "ddpo"]["log"])
    text = capsys.readouterr().out
    assert "| sdxl | prdp | ok |" in text and f"wrote {out}" in text


def test_the_full_modes_runs_pass_each_trainers_checks(tiny_pipeline_dir, tiny_sd3_dir):
    gpu_check = configured()
    assert {m for m, _ in gpu_check.RUNS} == set(gpu_check.SHAPES) == set(gpu_check.TINY_SHAPES)
    for model, trainer in gpu_check.RUNS:  # SD 3.5's on an SD3 folder (with T5), the others' on SD 1.5's
        configurator.configure(vars(bench), [f"--model={tiny_sd3_dir if model == 'sd3' else tiny_pipeline_dir}"])
        bench.check_trainer(trainer, gpu_check.run_args(model, trainer))  # SystemExit on a bad option
    recipes = {r["recipe"].split(",")[0]: r["batch"] for r in gpu_memory.sd3_recipes(
        {p: dict(params=1, trainable=1, activation_gb=1.0) for p in gpu_memory.SD3_PARTS})}
    ddpo, alignprop, prdp = (" ".join(gpu_check.run_args("sd3", t)) for t in ("ddpo", "alignprop", "prdp"))
    assert f"--train_batch_size={recipes['DDPO']} " in ddpo and "--kl_beta=" in ddpo and "--eta=0.7" in ddpo
    assert f"--batch_size={recipes['AlignProp']} " in alignprop and f"--train_batch_size={recipes['PRDP']} " in prdp


def test_sd3_t5_tokenizer_has_t5s_size():
    """SD 3.5's T5 tokenizer, built offline: T5's 32,100 entries, ids within the encoder's embeddings,
    prompts padded to SD 3.5's 256 tokens and ended by </s>."""
    gpu_check = configured()
    tok = gpu_check.t5_tokenizer()
    ids = tok(["a cat riding a bike"], padding="max_length", max_length=256, truncation=True).input_ids[0]
    assert len(tok) == 32_100 and max(tok.get_vocab().values()) < gpu_memory.SD3_T5["vocab_size"]
    assert len(ids) == 256 and ids[ids.index(tok.eos_token_id) + 1:] == [tok.pad_token_id] * (255 - ids.index(tok.eos_token_id))


def test_sd3_pipeline_builds_without_t5(tmp_path):
    """--sd3_t5=false: the tiny SD 3.5 folder has no T5, and the trainers' loader loads it so."""
    import pipelines
    gpu_check = configured("--tiny", "--sd3_t5=false")
    built = gpu_check.build_pipeline("sd3", str(tmp_path), "cpu", torch.float32)
    assert built["params"]["t5"] == 0 and built["frozen"] == sum(built["params"].values())
    pipe = pipelines.load_pipeline(str(tmp_path))
    assert pipe.text_encoder_3 is None and type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.scheduler.config.shift == 3.0


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
    sd3 = gpu_check.estimate("sd3", "ddpo", dict(train_batch_size=2, sample_batch_size=4, lora_rank=32, kl_beta=0.01),
                             counts)
    act = gpu_memory.MEASURED_GB["sd3"]  # the KL term's call to the pretrained transformer, without gradient
    assert sd3["weights_gb"] == pytest.approx(2 + 16 * 32000 / 1024 ** 3)
    assert sd3["estimate_gb"] == pytest.approx(sd3["weights_gb"] + 2 * (act["sd3"] + act["sd3_eval"]))
    prdp = gpu_check.estimate("sd3", "prdp", dict(train_batch_size=2, sample_batch_size=4, lora_rank=4), counts)
    assert prdp["training_gb"] == pytest.approx(2 * act["sd3"]) and prdp["sampling_gb"] == pytest.approx(4 * act["vae_eval"])


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
    (["--models=sd4"], "--models takes sd15, sdxl, sd3"),
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
