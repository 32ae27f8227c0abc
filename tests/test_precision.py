"""Mixed precision (plumbing/mixed_precision.py) on the CPU, whose autocast supports bf16 and fp16: each part's
dtype, the UNet computing in bf16 while the latents, DDIM step and log-probs stay fp32, DDPO's first
PPO ratio within the clip range under bf16 with the GPU recipe's batch shapes (docs/gpu.md), and AlignProp's
gradient through the bf16 VAE finite and pointing where the fp32 one points (fp16: with the loss
scaler), all on the tiny random SD-shaped folder."""
import pytest
import torch

import lora
import pipelines
import rewards
import sampling
from plumbing import mixed_precision
from conftest import read_log, run_trainer

PROMPTS = ["a (red) (circle)", "a (blue) (square) on a (dark) background"]


def test_each_part_in_the_dtype_of_its_precision(tiny_pipeline_dir):
    want = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
            "fp16": (torch.float16, torch.float32), "auto": (torch.float32, torch.float32)}  # auto on a CPU: fp32
    for precision, (unet, vae) in want.items():
        pipe = pipelines.load_pipeline(tiny_pipeline_dir, precision=precision)
        assert (pipe.unet.dtype, pipe.text_encoder.dtype, pipe.vae.dtype) == (unet, unet, vae), precision
    assert mixed_precision.unet_dtype("auto", "cuda") == torch.bfloat16  # no GPU needed to ask
    assert mixed_precision.unet_dtype("auto", "cuda:1") == torch.bfloat16
    assert mixed_precision.unet_dtype("auto", torch.device("cpu")) == torch.float32


def unet_input_dtypes(pipe):
    """Record the dtype every Linear and Conv2d of the UNet computes in (the input autocast hands it)."""
    seen = set()
    mods = [m for m in pipe.unet.modules() if type(m) in (torch.nn.Linear, torch.nn.Conv2d, lora.LoRALinear)]
    hooks = [m.register_forward_hook(lambda m, a, out: seen.add(out.dtype)) for m in mods]
    return seen, hooks


def test_bf16_unet_computes_in_bf16_and_the_chain_stays_fp32(tiny_pipeline_dir):
    fp32 = pipelines.load_pipeline(tiny_pipeline_dir, precision="fp32")
    bf16 = pipelines.load_pipeline(tiny_pipeline_dir, precision="bf16")
    for p in (fp32, bf16):
        torch.manual_seed(0)
        lora.inject(p.unet)
    trajs = {}
    for name, p in (("fp32", fp32), ("bf16", bf16)):
        seen, hooks = unet_input_dtypes(p)
        cond = sampling.encode_prompts(p, PROMPTS * 2)
        with torch.no_grad():
            trajs[name] = sampling.rollout(p, cond, sampling.encode_prompts(p, [""]), 5.0, num_steps=4, eta=1.0,
                                           generator=torch.Generator().manual_seed(0))
        for h in hooks:
            h.remove()
        assert seen == {torch.bfloat16 if name == "bf16" else torch.float32}, name
    a, b = trajs["fp32"], trajs["bf16"]
    assert b.latents.dtype == b.log_probs.dtype == b.cond.dtype == b.images.dtype == torch.float32
    assert all(m.lora_A.dtype == m.lora_B.dtype == torch.float32 for m in lora.layers(bf16.unet).values())
    # the same chain, rounded differently: close, not equal (bf16 keeps 8 bits of mantissa)
    diff = (a.latents - b.latents).abs().max().item()
    assert 0 < diff < 0.1 * a.latents.abs().max().item()


def test_a_bf16_ddpo_epoch_keeps_the_first_ratio_within_the_clip_range(tiny_pipeline_dir, prompt_file, tmp_path):
    """The GPU recipe's shapes (8 images per sampling call, 4 per training micro-batch) and its clip
    range 1e-4: the recorded log-probs and their recomputation must agree to well within it."""
    out = tmp_path / "run"
    mod = run_trainer("train_ddpo", f"--model={tiny_pipeline_dir}", "--reward=jpeg_incompressibility",
                      f"--prompts={prompt_file}", "--precision=bf16", "--num_steps=6", "--sample_batch_size=8",
                      "--samples_per_prompt=2", "--num_batches=1", "--train_batch_size=4", "--grad_accum=2",
                      "--clip_range=1e-4", "--epochs=1", "--eval_prompts=2", "--eval_seeds=1", f"--out={out}")
    (rec,) = read_log(out)
    assert mod.precision == "bf16" and rec["skipped_updates"] == 0
    assert rec["ratio_dev"] < 1e-4 / 10, rec["ratio_dev"]


def alignprop_gradient(pipe, reward_fn):
    """The LoRA gradient of AlignProp's loss with K = all steps: through the VAE decode and the reward."""
    torch.manual_seed(0)
    params = lora.inject(pipe.unet)
    with torch.no_grad():
        for m in lora.layers(pipe.unet).values():
            m.lora_B.normal_(std=0.02, generator=torch.Generator().manual_seed(1))  # B = 0 would zero A's gradient
    scaler = mixed_precision.grad_scaler(pipe.unet)
    cond = sampling.encode_prompts(pipe, PROMPTS * 2)
    traj = sampling.rollout(pipe, cond, sampling.encode_prompts(pipe, [""]), 5.0, num_steps=4, eta=0.0,
                            generator=torch.Generator().manual_seed(0), grad_steps=4)
    scaler.scale(-reward_fn(traj.images, PROMPTS * 2).mean()).backward()
    grads = torch.cat([p.grad.flatten() for p in params])
    return grads / scaler.get_scale() if scaler.is_enabled() else grads


@pytest.mark.parametrize("precision, cosine", [("bf16", 0.7), ("fp16", 0.99)])
def test_alignprop_gradient_through_the_vae_is_finite_and_points_as_fp32s(tiny_pipeline_dir, precision, cosine):
    """Measured here: cosine 0.87 with bf16 (0.85 with the UNet alone in bf16, 0.994 with the VAE alone:
    the UNet's 8-bit mantissa through 4 steps of a random network turns it), 0.99995 with fp16 (11 bits)."""
    reward_fn = rewards.load("shapes_appeal")  # differentiable in the image, no weights
    ref = alignprop_gradient(pipelines.load_pipeline(tiny_pipeline_dir, precision="fp32"), reward_fn)
    pipe = pipelines.load_pipeline(tiny_pipeline_dir, precision=precision)
    g = alignprop_gradient(pipe, reward_fn)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    assert torch.nn.functional.cosine_similarity(g, ref, dim=0) > cosine  # random directions: ~0.01
    assert g.norm() == pytest.approx(ref.norm().item(), rel=0.2)  # fp16: unscaled back to the true size


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_alignprop_run_in_low_precision_updates_the_lora(tiny_pipeline_dir, prompt_file, tmp_path, precision):
    """fp16 runs with the loss scaler: its first updates may overflow and be skipped while the scale
    backs off, which is not a fault; the logged gradient norm is the unscaled one."""
    norms = {}
    for p in ("fp32", precision):
        out = tmp_path / p
        run_trainer("train_alignprop", f"--model={tiny_pipeline_dir}", "--reward=shapes_appeal", f"--prompts={prompt_file}",
                    f"--precision={p}", "--num_steps=4", "--batch_size=2", "--steps_per_epoch=3", "--epochs=1",
                    "--truncation=all", "--eval_prompts=1", "--eval_seeds=1", f"--out={out}")
        (rec,) = read_log(out)
        norms[p] = rec["grad_norm"]
    assert torch.isfinite(torch.tensor(norms[precision])) and norms[precision] > 0
    assert norms[precision] == pytest.approx(norms["fp32"], rel=0.3)


def test_the_loss_scaler_backs_off_only_while_its_scale_is_above_one():
    fp16 = torch.nn.Linear(2, 2).half()
    fp16.dtype, fp16.device = torch.float16, torch.device("cpu")  # what mixed_precision reads from a UNet
    scaler = mixed_precision.grad_scaler(fp16)
    assert scaler.is_enabled() and mixed_precision.backing_off(scaler)
    w = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([w], lr=1.0)
    steps = 0
    while mixed_precision.backing_off(scaler):  # an overflow every step: the scale halves down to 1
        scaler.scale(w * float("inf")).sum().backward()
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        steps += 1
    assert steps == 16 and scaler.get_scale() == 1.0 and w.item() == 1.0  # 65536 = 2^16; no step taken
    bf16 = torch.nn.Linear(2, 2).bfloat16()
    bf16.dtype, bf16.device = torch.bfloat16, torch.device("cpu")
    assert not mixed_precision.grad_scaler(bf16).is_enabled()  # bf16 has fp32's range: no scaling
