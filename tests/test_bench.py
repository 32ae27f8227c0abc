"""experiments/bench.py (and experiments/bench_parts.py) on the tiny pipeline: the epoch breakdown adds up,
the UNet calls it counts are the trainers' analytic numbers, what it books where (the observer's reward and
writing, sampling.replay as training), the timers leave the library's functions as they were, and bad
input; gpu_memory's recipe arithmetic, SDXL's and SD 3.5's published shapes, and the weights that take no
memory they are measured with."""
import os
import subprocess
import sys

import pytest
import torch

import lora
import sampling
from experiments import bench_parts, gpu_memory
from plumbing import configurator


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: timings with one torch thread


def configured(*argv):
    return configurator.fresh("experiments.bench", argv)


def check_breakdown(b):
    """Every section took time, none overlaps another (the timed sections fit inside the epoch's wall
    time, which is measured separately, between the ends of two epochs), and the epoch wall time
    covers what the trainer logged for the epoch."""
    measured = ("sampling", "decoding", "reward", "train forward", "train backward", "optimizer")
    assert all(b["seconds"][s] > 0 for s in measured)
    assert sum(b["seconds"][s] for s in measured) + b["writing"] <= b["wall"]  # double counting would break this
    assert 0 < b["writing"] <= b["seconds"]["overhead"]  # checkpoint and log writing is part of the overhead
    assert b["wall"] >= b["logged"] - 0.01  # the log rounds to 10 ms and leaves out checkpointing
    assert all(k["seconds_each"] > 0 for k in b["unet_calls"])
    assert b["unet_seconds"] == pytest.approx(sum(k["count"] * k["seconds_each"] for k in b["unet_calls"]))
    # the tiny UNet is a small part of an epoch: decoding, JPEG, logging are not UNet work
    assert b["overhead_ratio"] == pytest.approx(b["wall"] / b["unet_seconds"]) and b["overhead_ratio"] > 1


@pytest.mark.slow
def test_ddpo_epoch_breakdown_and_unet_calls(tiny_pipeline_dir, prompt_file, capsys):
    bench = configured(f"--model={tiny_pipeline_dir}", "--trainers=ddpo", "--batch_sizes=1,2", "--repeats=1",
                       "--num_steps=2", "--epochs=2", "--no-compiled",  # Inductor would cost minutes: see below
                       f"--ddpo_args=--reward=jpeg_incompressibility --prompts={prompt_file} --num_steps=3 "
                       "--sample_batch_size=2 --samples_per_prompt=2 --num_batches=2 --train_batch_size=4 "
                       "--timestep_fraction=1")  # every step trained: the counts below
    timed = (sampling.guided_eps, sampling.replay, sampling.rollout, torch.autograd.backward,
             torch.nn.utils.clip_grad_norm_)  # what bench wraps while the trainer runs
    (b,), speeds = bench.main()
    check_breakdown(b)
    assert b["queries"] == 4  # 2 batches x 2 samples per epoch
    # sampling: 2 batches x 3 steps, CFG-batched on 2 x 2 latents, no gradient; training: one
    # micro-batch of 4 (CFG: 8) x 3 recorded steps, forward and backward. 16 = tokens, 16 = width.
    calls = {(tuple(k["x"]), tuple(k["emb"]), k["grad"]): k["count"] for k in b["unet_calls"]}
    assert calls == {((4, 4, 8, 8), (4, 16, 16), False): 6, ((8, 4, 8, 8), (8, 16, 16), True): 3}
    assert [s["batch"] for s in speeds] == [1, 2] and all(s["batched"] > 0 and s["unbatched"] > 0 for s in speeds)
    text = capsys.readouterr().out
    for row in bench.SECTIONS + ["**wall time**", "**overhead ratio**"]:
        assert f"| {row}" in text
    assert "6 x fwd [4] + 3 x fwd+bwd [8]" in text
    # 7., the compiled columns, on this epoch's numbers with made-up compiled ones (compiling the tiny UNet
    # with Inductor, cold and warm, would cost minutes of the suite)
    b["compiled"] = dict(wall=b["wall"] / 2, seconds={s: v / 2 for s, v in b["seconds"].items()},
                         first_cold=100.0, first_warm=b["first"])
    lines = bench_parts.markdown([b], [], sections=bench.SECTIONS, model=bench.model, num_steps=bench.num_steps,
                                 guidance=bench.guidance).splitlines()
    assert "| one epoch | ddpo s | ddpo share | ddpo compiled s | speed-up |" in lines
    assert any(l.startswith("| **wall time** |") and l.endswith(f"| **{b['wall'] / 2:.3f}** | **2.00x** |") for l in lines)
    assert any("cold / warm compiler cache" in l and f"| 100.0 / {b['first']:.1f} |" in l for l in lines)
    # the timers are gone: the functions the trainers call are the originals again
    assert sampling.guided_eps.__module__ == "sampling" and not hasattr(sampling.guided_eps, "__wrapped__")
    assert (sampling.guided_eps, sampling.replay, sampling.rollout, torch.autograd.backward,
            torch.nn.utils.clip_grad_norm_) == timed


@pytest.mark.slow
def test_alignprop_epoch_breakdown_and_unet_calls(tiny_pipeline_dir, prompt_file):
    bench = configured(f"--model={tiny_pipeline_dir}", "--trainers=alignprop", "--batch_sizes=", "--repeats=1", "--no-compiled",
                       f"--alignprop_args=--reward=shapes_appeal --prompts={prompt_file} --num_steps=3 "
                       "--batch_size=2 --steps_per_epoch=2 --truncation=1")
    (b,), speeds = bench.main()
    check_breakdown(b)
    assert b["queries"] == 4 and speeds == []
    # 2 updates x 3 steps on 2 x 2 latents: the first 2 of each without gradient, the last with it
    calls = {(k["x"][0], k["grad"]): k["count"] for k in b["unet_calls"]}
    assert calls == {(4, False): 4, (4, True): 2}


@pytest.mark.slow
def test_prdp_epoch_breakdown_and_unet_calls(tiny_pipeline_dir, prompt_file):
    bench = configured(f"--model={tiny_pipeline_dir}", "--trainers=prdp", "--batch_sizes=", "--repeats=1", "--no-compiled",
                       f"--prdp_args=--reward=jpeg_incompressibility --prompts={prompt_file} --num_steps=3 "
                       "--prompts_per_epoch=1 --images_per_prompt=2 --sample_batch_size=2 --train_batch_size=2 "
                       "--updates_per_epoch=2")
    (b,), speeds = bench.main()
    check_breakdown(b)
    assert b["queries"] == 2 and speeds == []
    # 3 steps, each call CFG-batched on 2 x 2 latents: sampling; the reference model's replay; update
    # 1 with gradient; update 2's replay without gradient, then with it
    calls = {(k["x"][0], k["grad"]): k["count"] for k in b["unet_calls"]}
    assert calls == {(4, False): 9, (4, True): 6}


def test_replay_of_recorded_steps_is_training_with_or_without_gradient(pipe):
    """Under bench's timers, sampling.replay (PRDP's reference model and recomputation without
    gradient, its update with) books as train forward and its backward as train backward, while
    rollout's UNet calls without gradient book as sampling; after the block, the originals are back."""
    bench = configured()
    params = lora.inject(pipe.unet, rank=2)
    cond, uncond = sampling.encode_prompts(pipe, ["a red circle"] * 2), sampling.encode_prompts(pipe, [""])
    with bench.library_timed():
        with torch.no_grad():
            traj = sampling.rollout(pipe, cond, uncond, 5.0, num_steps=2, decode=False,
                                    generator=torch.Generator().manual_seed(0))
        data = dict(latents=traj.latents, log_probs=traj.log_probs, cond=traj.cond, uncond=traj.uncond,
                    scale=traj.guidance.expand(2, -1))
        bench.settle()
        assert set(bench._times) == {"sampling"}
        bench._times.clear()
        with torch.no_grad():
            sampling.replay(pipe.unet, pipe.scheduler, data, traj.timesteps, 1.0, 2)
        bench.settle()
        assert set(bench._times) == {"train forward"}
        bench._times.clear()
        sampling.replay(pipe.unet, pipe.scheduler, data, traj.timesteps, 1.0, 1, weights=torch.ones(2, 2))
        bench.settle()
        assert set(bench._times) == {"train forward", "train backward"} and all(p.grad is not None for p in params)
    assert not bench._times and not hasattr(sampling.replay, "__wrapped__")
    assert not hasattr(torch.autograd.backward, "__wrapped__") and not hasattr(sampling.rollout, "__wrapped__")


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3"])
def test_pure_unet_time_calls_the_net_as_guided_eps_does(family):
    """unet_seconds times a bf16 UNet (the trainers' default on a GPU) under its autocast, in its dtype, and
    SD 3.5's transformer with its pooled embeddings (the timestep by name: the transformer's second
    argument is the text); with gradient too, leaving no gradient behind. It failed on bf16 before."""
    from conftest import tiny_pipeline, tiny_sd3_pipeline, tiny_sdxl_pipeline
    bench = configured("--repeats=1")
    net = sampling.denoiser({"sd15": tiny_pipeline, "sdxl": tiny_sdxl_pipeline, "sd3": tiny_sd3_pipeline}[family]())
    net = net.to(torch.bfloat16).requires_grad_(False)
    params = lora.inject(net, rank=2)
    width = net.config.get("cross_attention_dim") or net.config.joint_attention_dim
    x = (2, net.config.in_channels, 8, 8)
    assert bench.unet_seconds(net, x, (2, 16, width), grad=False) > 0
    assert bench.unet_seconds(net, x, (2, 16, width), grad=True) > 0 and all(p.grad is None for p in params)


def test_the_observer_times_the_reward_and_closes_each_epoch_with_the_runs_writing_seconds(pipe):
    """loaded(run) hooks the UNet (eager runs) and replaces run.reward_fn with a timed one (the same
    reward: its result and attributes); epoch_end(rec, writing) closes the epoch's books: its
    sections, `writing` booked as writing, the log record's seconds and queries, the UNet calls."""
    import types
    bench = configured()
    reward = lambda images, prompts: torch.ones(len(images))
    reward.name, reward.differentiable = "ones", False
    run = types.SimpleNamespace(pipe=pipe, reward_fn=reward, config={})
    watcher = bench.Watcher(count_calls=True)
    watcher.loaded(run)
    try:
        assert run.reward_fn is not reward and run.reward_fn.__wrapped__ is reward
        assert run.reward_fn.name == "ones" and not run.reward_fn.differentiable
        assert run.reward_fn(torch.zeros(3, 3, 8, 8), ["a"] * 3).tolist() == [1, 1, 1]
        cond = sampling.encode_prompts(pipe, ["a red circle"] * 2)
        with torch.no_grad():
            sampling.guided_eps(pipe.unet, torch.randn(2, 4, 8, 8), 500, cond, sampling.encode_prompts(pipe, [""]), 5.0)
        watcher.epoch_end(dict(seconds=1.5, reward_queries=3), 0.25)
    finally:
        watcher.hook.remove()
    (mark,) = watcher.marks
    assert set(mark["times"]) == {"reward", "writing"} and mark["times"]["writing"] == 0.25
    assert 0 < mark["times"]["reward"] < 1 and mark["logged"] == 1.5 and mark["queries"] == 3
    assert mark["calls"] == {((4, 4, 8, 8), (4, 16, 16), False): 1}  # one CFG-batched call on 2 x 2 latents
    assert not bench._times and not watcher.calls  # the next epoch starts with empty books


def test_section_timers_exclude_nested_sections():
    """A section's time leaves out the sections called inside it, so they can be added up: an outer
    section that sleeps 0.05 s and calls an inner one that sleeps 0.1 s books 0.05 s and 0.1 s."""
    import time
    bench = configured()
    inner = bench.timed("inner", lambda: time.sleep(0.1))
    outer = bench.timed("outer", lambda: (time.sleep(0.05), inner()))
    bench._times.clear()
    outer()
    assert not bench._times  # read once per epoch (settle), not at each boundary: a GPU is never stalled
    bench.settle()
    assert 0.1 <= bench._times["inner"] < 0.15  # the outer section's 0.05 s is not in it
    assert 0.05 <= bench._times["outer"] < 0.15  # nor the inner section's 0.1 s in the outer
    bench._times.clear()


@pytest.mark.parametrize("argv, message", [
    (["--trainers=ddpo,sgd"], "--trainers takes ddpo, alignprop"),
    (["--ddpo_args=--out=x"], "--ddpo_args must not set --out"),
    (["--alignprop_args=--stop-after=3"], "--alignprop_args must not set --stop_after"),
    (["--warmup=0"], "--warmup"),
    (["--batch_sizes=1,two"], "--batch_sizes must be comma-separated integers"),
    (["--batch_sizes=0"], "every batch size must be >= 1"),
    (["--truncations=1,rand"], "--truncations takes K values"),
])
def test_bad_input_is_a_one_line_error(argv, message):
    with pytest.raises(SystemExit) as e:
        configured(*argv).main()
    assert str(e.value).startswith("error:") and message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_run_child_reports_each_childs_own_peak_memory(tmp_path):
    """A child that touches 300 MB peaks >= 250 MB above one that does nothing, and neither carries
    the parent's (this pytest process's) memory; a failing child still reports."""
    run_child = bench_parts.run_child
    (tmp_path / "big.py").write_text("b = bytearray(300 * 2**20)\nb[::4096] = b'x' * len(b[::4096])\n")
    (tmp_path / "small.py").write_text("pass\n")
    (tmp_path / "fail.py").write_text("raise SystemExit(3)\n")
    code_big, peak_big = run_child([tmp_path / "big.py"], tmp_path / "big.txt")
    code_small, peak_small = run_child([tmp_path / "small.py"], tmp_path / "small.txt")
    assert code_big == code_small == 0 and peak_big - peak_small >= 250
    assert peak_small < 100  # a bare Python, not the parent's hundreds of MB
    code, peak = run_child([tmp_path / "fail.py"], tmp_path / "fail.txt")
    assert code == 3 and 0 < peak < 100


@pytest.mark.slow
def test_truncation_table_rows_and_a_failing_setting(tiny_pipeline_dir, prompt_file):
    bench = configured(f"--model={tiny_pipeline_dir}")
    args = [*bench.model_args(), f"--prompts={prompt_file}", "--reward=shapes_appeal", "--num_steps=3",
            "--batch_size=2", "--steps_per_epoch=1", "--eval_prompts=1", "--eval_seeds=1"]
    rows = bench_parts.truncation_table(["1", "all"], args)
    assert [(r["k"], r["checkpointing"]) for r in rows] == [("1", False), ("1", True), ("all", False), ("all", True)]
    assert all(r["peak_mb"] > 50 and r["seconds_per_step"] > 0 for r in rows)  # a Python + torch process
    with pytest.raises(SystemExit, match="K=4"):  # more steps with gradient than the chain has
        bench_parts.truncation_table(["4"], args)


def test_rise_mb_measures_a_known_allocation():
    # 400 MB of float32 made and freed inside fn: the peak rises by that much and no more (the
    # process's own size before the call is not counted), the same on a second call
    alloc = lambda: torch.ones(100_000_000).add_(1).sum()
    assert [round(gpu_memory.rise_mb(alloc) / 100) for _ in range(2)] == [4, 4]
    assert gpu_memory.rise_mb(lambda: torch.ones(10).sum()) < 20


def test_sd_recipes_against_a_hand_computation():
    parts = dict(unet=dict(params=1000, trainable=10, activation_gb=2.0), vae=dict(params=100, activation_gb=4.0),
                 unet_eval=dict(params=1000, activation_gb=0.25), vae_eval=dict(params=100, activation_gb=0.75),
                 vitl=dict(params=50, activation_gb=0.5), vith=dict(params=80, activation_gb=1.0))
    rows = {r["recipe"]: r for r in gpu_memory.sd_recipes(parts)}
    text_encoder = 123_060_480  # SD 1.5's CLIP ViT-L/14 text encoder, its published size
    # bf16 (2 bytes): UNet, VAE, text encoder; the LoRA's 10 weights 16 bytes each (fp32 weight,
    # gradient and AdamW's two moments); the reward fp32 (4 bytes)
    w = ((990 + 100 + text_encoder) * 2 + 10 * 16 + 50 * 4) / 2 ** 30
    assert rows["DDPO, aesthetic"]["weights_gb"] == pytest.approx(w)
    assert rows["DDPO, aesthetic"]["total_gb"] == pytest.approx(w + 4 * 2.0)  # 4 images, one UNet call each
    assert rows["DDPO, aesthetic"]["eval_gb"] == pytest.approx(w + 16 * 0.75)  # 16 at a time, the decode's peak
    per_image = 2.0 + 4.0 + 1.0  # UNet + VAE + ViT-H, each with its backward
    assert rows["AlignProp, pickscore"]["per_image_gb"] == pytest.approx(per_image)
    w_vith = w + 30 * 4 / 2 ** 30
    assert rows["AlignProp, pickscore"]["fits"] == {m: int((m - w_vith) // per_image) for m in (24, 40, 80)}


def test_sdxl_recipes_against_a_hand_computation():
    parts = dict(xl_unet=dict(params=1000, trainable=10, activation_gb=5.0), vae=dict(params=100, activation_gb=4.0),
                 xl_unet_eval=dict(params=1000, activation_gb=1.5), vae_eval=dict(params=100, activation_gb=1.25),
                 vitl=dict(params=50, activation_gb=0.5), vith=dict(params=80, activation_gb=1.0))
    rows = {r["recipe"]: r for r in gpu_memory.sdxl_recipes(parts)}
    text_encoders = 123_060_480 + 694_659_840  # CLIP ViT-L/14's and OpenCLIP ViT-bigG/14's text towers, published sizes
    # bf16 (2 bytes): UNet, VAE (force_upcast only forbids fp16) and both text encoders; the LoRA's 10
    # weights 16 bytes each; the reward fp32 (4 bytes)
    w = ((990 + 100 + text_encoders) * 2 + 10 * 16 + 80 * 4) / 2 ** 30
    assert rows["DDPO, pickscore"]["weights_gb"] == pytest.approx(w)
    assert rows["DDPO, pickscore"]["total_gb"] == pytest.approx(w + 2 * 5.0)  # 2 images, one UNet call each
    assert rows["DDPO, pickscore"]["eval_gb"] == pytest.approx(w + 16 * 1.5)  # 16 at a time, the UNet calls' peak
    per_image = 5.0 + 4.0 + 1.0  # UNet + VAE + ViT-H, each with its backward
    assert rows["AlignProp, pickscore"]["per_image_gb"] == pytest.approx(per_image)
    assert rows["AlignProp, pickscore"]["total_gb"] == pytest.approx(w + 1 * per_image)


def test_sdxl_shapes_are_the_published_models():
    """The configs build SDXL base 1.0's parameter counts (as published with its weights)."""
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        assert sum(p.numel() for p in UNet2DConditionModel(**gpu_memory.SDXL_UNET).parameters()) == 2_567_463_684
    assert gpu_memory.text_encoder_params(gpu_memory.SDXL_TEXT_ENCODER_2, projection=True) == 694_659_840


def test_sd3_recipes_against_a_hand_computation():
    parts = dict(sd3=dict(params=1000, trainable=10, activation_gb=5.0), vae=dict(params=100, activation_gb=4.0),
                 sd3_eval=dict(params=1000, activation_gb=1.5), vae_eval=dict(params=100, activation_gb=1.25),
                 vith=dict(params=80, activation_gb=1.0))  # no aesthetic tower: the recipes are PickScore's
    rows = {r["recipe"]: r for r in gpu_memory.sd3_recipes(parts)}
    assert list(rows) == ["DDPO, pickscore, LoRA rank 32, KL", "AlignProp, pickscore", "PRDP, pickscore"]
    # CLIP ViT-L/14's and OpenCLIP ViT-bigG/14's text towers with their projections, T5-XXL's encoder
    text_encoders = 123_650_304 + 694_659_840 + 4_762_310_656
    # bf16: transformer (the LoRA's rank-4 weights are not frozen), VAE and the three text encoders; the
    # LoRA fp32 with gradient and AdamW's moments (16 bytes), at rank 4 (10 weights) or DDPO's 32 (80);
    # PickScore's ViT-H fp32
    frozen = ((990 + 100 + text_encoders) * 2 + 80 * 4) / 2 ** 30
    ddpo, alignprop, prdp = rows.values()
    assert alignprop["weights_gb"] == prdp["weights_gb"] == pytest.approx(frozen + 10 * 16 / 2 ** 30)
    assert ddpo["weights_gb"] == pytest.approx(frozen + 80 * 16 / 2 ** 30)
    # DDPO: its call with gradient, and the KL's call to the pretrained model without, while the graph is held
    assert ddpo["per_image_gb"] == pytest.approx(5.0 + 1.5)
    assert ddpo["total_gb"] == pytest.approx(ddpo["weights_gb"] + 2 * 6.5)
    assert prdp["total_gb"] == pytest.approx(prdp["weights_gb"] + 2 * 5.0)  # the same calls, no KL
    assert alignprop["total_gb"] == pytest.approx(alignprop["weights_gb"] + 5.0 + 4.0 + 1.0)  # + decode + ViT-H
    assert prdp["eval_gb"] == pytest.approx(prdp["weights_gb"] + 16 * 1.5)  # 16 at a time, the transformer's peak
    assert prdp["fits"] == {m: int((m - prdp["weights_gb"]) // 5.0) for m in (24, 40, 80)}
    # --no-t5 leaves T5's bf16 weights out
    assert gpu_memory.sd3_text_params() - gpu_memory.sd3_text_params(t5=False) == 4_762_310_656


def test_sd3_shapes_are_the_published_models():
    """SD 3.5 Medium's configs build its parameter counts: the transformer's 2.24 billion and its
    position table (a buffer saved with the weights, 384 x 384 positions x 1536), 2.47 billion
    together, the "2.5 billion" SD 3.5 Medium is published as; T5-XXL's encoder, 4.76 billion; the
    VAE; and the rank-4 LoRA that lora.inject puts on both streams of the joint attention."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**gpu_memory.SD3_TRANSFORMER)
        assert sum(p.numel() for p in AutoencoderKL(**gpu_memory.SD3_VAE).parameters()) == 83_819_683
    assert sum(p.numel() for p in transformer.parameters()) == 2_243_171_520
    assert sum(b.numel() for b in transformer.buffers()) == 384 * 384 * 1536 == 226_492_416
    assert gpu_memory.t5_params() == 4_762_310_656
    lora.inject(transformer, rank=4)
    # 4 x (1536 + 1536) per layer: 8 in each of the 24 blocks, less the last block's to_add_out (its text
    # stream ends there), + 4 in each of the 13 blocks' second (image-only) attention
    per_layer = 4 * (1536 + 1536)
    assert sum(p.numel() for p in transformer.parameters() if p.requires_grad) == per_layer * (24 * 8 - 1 + 13 * 4) == 2_985_984


def test_sd3_measured_activations_are_the_docs_table():
    """gpu_memory.MEASURED_GB["sd3"] holds docs/sd3.md's activation column."""
    lines = open(os.path.join(os.path.dirname(os.path.dirname(gpu_memory.__file__)), "docs", "sd3.md")).read().splitlines()
    for part, gb in gpu_memory.MEASURED_GB["sd3"].items():
        row = [l.strip("| ").split(" | ") for l in lines if l.startswith(f"| {gpu_memory.SD3_PARTS[part]} |")]
        assert len(row) == 1 and len(row[0]) == 5 and row[0][-1] == f"{gb:.2f}", (part, row)


BROADCAST_CHECK = """
import sys, torch, lora, sampling
from experiments import gpu_memory
from diffusers import SD3Transformer2DModel, UNet2DConditionModel
torch.manual_seed(0)
if sys.argv[2] == "sd3":  # SD 3.5's joint-attention transformer, small: 1,024 image + 333 text tokens
    Net = SD3Transformer2DModel
    config = dict(sample_size=64, patch_size=2, in_channels=16, out_channels=16, num_layers=4, attention_head_dim=64,
                  num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=256, pooled_projection_dim=32,
                  pos_embed_max_size=64, dual_attention_layers=(0,), qk_norm="rms_norm")
    x, emb = torch.randn(1, 16, 64, 64), dict(embeds=torch.randn(1, 333, 64), pooled=torch.randn(1, 32))
else:
    Net = UNet2DConditionModel
    config = dict(sample_size=64, block_out_channels=(64, 128), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64, attention_head_dim=4)
    x, emb = torch.randn(1, 4, 64, 64), torch.randn(1, 77, 64)
if sys.argv[1] == "broadcast":
    with torch.device("meta"):
        unet = Net(**config)
    gpu_memory.broadcast_weights(unet, torch.bfloat16)
else:
    unet = Net(**config).to(torch.bfloat16).requires_grad_(False)
lora.inject(unet, rank=4)
out = {}
run = lambda: out.setdefault("y", sampling.guided_eps(unet, x, 500, emb, emb, 5.0)).square().mean().backward()
mb = gpu_memory.rise_mb(run)
frozen = sum(p.untyped_storage().nbytes() for p in unet.parameters() if not p.requires_grad)  # all but the LoRA
print("rise", mb, bool(torch.isfinite(out["y"]).all()), frozen)
"""


@pytest.mark.slow
@pytest.mark.parametrize("net", ["unet", "sd3"])
def test_broadcast_weights_keep_the_activation_memory_of_real_weights(net):
    """What gpu_memory measures SDXL's UNet and SD 3.5's transformer with: bf16 weights that take no
    memory, the same activations as real ones, in the trainers' call (sampling.guided_eps, bf16 autocast)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    got = {}
    for kind in ("real", "broadcast"):
        r = subprocess.run([sys.executable, "-c", BROADCAST_CHECK, kind, net], capture_output=True, text=True, env=env,
                           cwd=os.path.dirname(os.path.dirname(gpu_memory.__file__)))  # the repository
        _, mb, finite, nbytes = r.stdout.split("\n")[-2].split()
        got[kind] = float(mb), finite == "True", int(nbytes)
    assert got["broadcast"][1] and got["real"][1]  # finite activations either way
    assert got["broadcast"][2] < 0.001 * got["real"][2]  # the frozen weights take no memory
    # bf16 real weights add a fixed ~3 MB at any latent size (measured at 32, 48 and 64: 105/102,
    # 177/174, 282/279 MB), so 64x64 latents, where that is 1%; the transformer: 160.1 / 160.7 MB
    assert got["real"][0] > (200 if net == "unet" else 120)
    assert got["broadcast"][0] == pytest.approx(got["real"][0], rel=0.03)
