"""The GPU path, in one command on a machine with CUDA (skipped elsewhere; this project has no GPU, so
these tests were written against the CPU runs of the same code and have not been run here):

    python -m pytest -q tests/test_cuda.py

Each trainer runs one epoch on the tiny random SD-shaped folder, and on the SD 3.5-shaped one, on the GPU with the default precision
there (bf16), at the GPU recipe's batch shapes (docs/gpu.md), and must show: the UNet in bf16 on the GPU asked
for; DDPO's and PRDP's first ratio within DDPO's SD 1.5 clip range (1e-4: the recorded log-probs and
their recomputation agree, i.e. sampling and training round alike); finite gradients; a peak GPU
memory a tiny model stays far below. Then experiments/bench.py's CUDA-event timers and its peak memory, and,
with two GPUs, a torchrun run whose ranks each take their own GPU."""
import math

import pytest
import torch

import pipelines
import sampling
from conftest import read_log, run_trainer, torchrun

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TINY_PEAK_MB = 1024  # the tiny model's weights are a few MB; its activations at these batches far less than 1 GB


@pytest.fixture
def loaded(monkeypatch):
    """The pipeline the trainer loaded, to check where and in which dtype its UNet ran."""
    seen = {}
    real = pipelines.load_pipeline

    def load_pipeline(*a, **k):
        seen["pipe"] = real(*a, **k)
        return seen["pipe"]
    monkeypatch.setattr(pipelines, "load_pipeline", load_pipeline)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return seen


@pytest.fixture(params=["sd", "sd3"])
def tiny_dir(request):
    """The tiny SD-shaped folder, then the tiny SD 3.5-shaped one (flow matching, T5 included)."""
    return request.getfixturevalue({"sd": "tiny_pipeline_dir", "sd3": "tiny_sd3_dir"}[request.param])


def check_gpu_run(loaded, rec, device=None):
    unet = sampling.denoiser(loaded["pipe"])  # the UNet, or SD 3.5's transformer
    assert unet.device == torch.device(device or "cuda:0")  # --device=cuda: the first GPU
    assert unet.dtype == torch.bfloat16 and loaded["pipe"].vae.dtype == torch.bfloat16  # auto on CUDA: bf16
    assert rec["skipped_updates"] == 0 and math.isfinite(rec["grad_norm"]) and rec["grad_norm"] > 0
    peak = torch.cuda.max_memory_allocated(unet.device) / 2**20
    assert 0 < peak < TINY_PEAK_MB, peak
    print(f"peak GPU memory {peak:.0f} MB; log: {rec}")


def test_ddpo_epoch_in_bf16(tiny_dir, prompt_file, tmp_path, loaded):
    out = tmp_path / "run"
    run_trainer("train_ddpo", f"--model={tiny_dir}", "--reward=jpeg_incompressibility",
                f"--prompts={prompt_file}", "--device=cuda", "--num_steps=10", "--sample_batch_size=8",
                "--samples_per_prompt=2", "--num_batches=2", "--train_batch_size=4", "--grad_accum=2",
                "--clip_range=1e-4", "--epochs=1", "--eval_prompts=3", "--eval_seeds=4", "--eval_batch_size=4",
                f"--out={out}")
    (rec,) = read_log(out)
    check_gpu_run(loaded, rec)
    assert rec["ratio_dev"] < 1e-4 / 10, rec["ratio_dev"]  # sampling and training UNet calls round alike


def test_alignprop_epoch_in_bf16(tiny_dir, prompt_file, tmp_path, loaded):
    out = tmp_path / "run"
    run_trainer("train_alignprop", f"--model={tiny_dir}", "--reward=shapes_appeal", f"--prompts={prompt_file}",
                "--device=cuda", "--num_steps=10", "--truncation=rand", "--k_min=1", "--k_max=10",
                "--batch_size=4", "--grad_accum=2", "--steps_per_epoch=2", "--epochs=1", "--eval_prompts=2",
                "--eval_seeds=2", f"--out={out}")
    (rec,) = read_log(out)
    check_gpu_run(loaded, rec)  # gradient checkpointing is on by default on CUDA: it ran too


def test_prdp_epoch_in_bf16(tiny_dir, prompt_file, tmp_path, loaded):
    out = tmp_path / "run"
    run_trainer("train_prdp", f"--model={tiny_dir}", "--reward=jpeg_incompressibility",
                f"--prompts={prompt_file}", "--device=cuda", "--num_steps=10", "--prompts_per_epoch=2",
                "--images_per_prompt=4", "--sample_batch_size=8", "--train_batch_size=4", "--updates_per_epoch=2",
                "--epochs=1", "--eval_prompts=2", "--eval_seeds=2", f"--out={out}")
    (rec,) = read_log(out)
    check_gpu_run(loaded, rec)
    assert rec["ratio_dev"] < 1e-5, rec["ratio_dev"]


def test_device_cuda_n_is_the_gpu_used(tiny_pipeline_dir, prompt_file, tmp_path, loaded):
    last = f"cuda:{torch.cuda.device_count() - 1}"
    out = tmp_path / "run"
    run_trainer("train_ddpo", f"--model={tiny_pipeline_dir}", "--reward=jpeg_incompressibility",
                f"--prompts={prompt_file}", f"--device={last}", "--num_steps=3", "--sample_batch_size=4",
                "--samples_per_prompt=2", "--num_batches=1", "--train_batch_size=4", "--epochs=1", "--eval_prompts=1",
                "--eval_seeds=1", f"--out={out}")
    check_gpu_run(loaded, read_log(out)[0], device=last)
    assert torch.cuda.current_device() == torch.cuda.device_count() - 1  # set_device: the rank's GPU is current


def test_bench_times_sections_with_cuda_events(tiny_pipeline_dir, prompt_file):
    import importlib
    from plumbing import configurator
    bench = importlib.reload(importlib.import_module("experiments.bench"))
    configurator.configure(vars(bench), [f"--model={tiny_pipeline_dir}", "--trainers=ddpo", "--batch_sizes=2",
                                         "--repeats=1", "--no-compiled", f"--ddpo_args=--reward=jpeg_incompressibility "
                                         f"--prompts={prompt_file} --num_steps=3 --sample_batch_size=4 "
                                         "--samples_per_prompt=2 --num_batches=1 --train_batch_size=4"])
    (b,), speeds = bench.main()
    assert all(b["seconds"][s] > 0 for s in ("sampling", "decoding", "train forward", "train backward", "optimizer"))
    assert sum(b["seconds"][s] for s in bench.SECTIONS[:-1]) <= b["wall"]
    assert 0 < b["peak_gpu_mb"] < TINY_PEAK_MB and speeds[0]["batched"] > 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_torchrun_ranks_take_their_own_gpus(tiny_pipeline_dir, prompt_file, tmp_path):
    out = tmp_path / "run"
    torchrun("train_ddpo.py", f"--model={tiny_pipeline_dir}", "--reward=jpeg_incompressibility",
                   f"--prompts={prompt_file}", "--device=cuda", "--num_steps=3", "--sample_batch_size=4",
                   "--samples_per_prompt=2", "--num_batches=1", "--train_batch_size=4", "--epochs=1",
                   "--eval_prompts=1", "--eval_seeds=1", f"--out={out}")
    (rec,) = read_log(out)
    assert rec["reward_queries"] == 8 and rec["ratio_dev"] < 1e-5  # two ranks x 4 samples, NCCL gathers
