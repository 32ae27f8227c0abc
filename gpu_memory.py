"""GPU memory of the README's Stable Diffusion 1.5 recipes, estimated on a machine with no GPU.

Random-weight modules of SD 1.5's exact shapes (the UNet with a rank-4 LoRA, the VAE decoder, and
the rewards' CLIP ViT-L/14 and ViT-H/14 image towers) run on the CPU in the dtypes the trainers use
on a GPU by default (--precision=bf16, mixed_precision.py: the UNet's weights bf16 and its call
under bf16 autocast, through sampling.guided_eps itself; the VAE bf16; the reward model fp32),
forward and backward, and forward alone as sampling and evaluation run them, each in its own
process; the rise of the process's peak resident memory is the activation memory of one image. A
recipe needs its weights + images per micro-batch x activations per image.

    python bench.py --trainers= --batch_sizes= --sd_memory     # ~3 min, at most ~7 GB of RAM
"""
import os
import subprocess
import sys

from types import SimpleNamespace

import torch

import lora
import sampling

SD15_UNET = dict(  # Stable Diffusion 1.5's unet/config.json (the arguments that differ from the defaults)
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
    freq_shift=0, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32,
    norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8)
SD15_VAE = dict(  # its vae/config.json
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=4, norm_num_groups=32, sample_size=512)
SD15_TEXT_ENCODER = dict(  # its text_encoder/config.json: CLIP ViT-L/14's text tower
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
SD_PARTS = {  # what one image costs, with its batch: one CFG'd UNet call is 2 latents
    "unet": "UNet call, 2 x 4x64x64 latents (one image with CFG), bf16 autocast, fwd+bwd into LoRA",
    "vae": "VAE decode in bf16, 1 x 4x64x64 -> 512x512, fwd+bwd into the latent",
    "unet_eval": "the same UNet call without gradient (sampling, evaluation)",
    "vae_eval": "the same VAE decode without gradient (sampling, evaluation)",
    "vitl": "CLIP ViT-L/14 image tower (aesthetic) in fp32, 1 x 224x224, fwd+bwd into the image",
    "vith": "CLIP ViT-H/14 image tower (PickScore) in fp32, 1 x 224x224, fwd+bwd into the image",
}
EVAL_BATCH = 16  # the trainers' --eval_batch_size


def _status_mb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def rise_mb(fn):
    """Run fn(); return the peak resident memory (MB) it added to what the process held before."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: reset VmHWM (the peak) to the current resident size
    before = _status_mb("VmRSS")
    fn()
    return _status_mb("VmHWM") - before


def sd_part_memory(part):
    """Build `part` (random weights, on the CPU), then print its parameter count, its trainable ones
    and the peak resident memory its forward (+ backward, unless an _eval part) adds (MB). Run in a
    fresh process (see sd_memory_table)."""
    torch.manual_seed(0)
    grad = not part.endswith("_eval")
    if part.startswith("unet"):
        from diffusers import UNet2DConditionModel
        module = UNet2DConditionModel(**SD15_UNET).to(torch.bfloat16).requires_grad_(False)
        lora.inject(module, rank=4)
        x, emb = torch.randn(1, 4, 64, 64), torch.randn(1, 77, 768)
        run = lambda: sampling.guided_eps(module, x, 500, emb, emb, 5.0)  # the trainers' call, CFG batched
    elif part.startswith("vae"):
        from diffusers import AutoencoderKL
        module = AutoencoderKL(**SD15_VAE).to(torch.bfloat16).requires_grad_(False)
        x = torch.randn(1, 4, 64, 64, requires_grad=grad)
        run = lambda: sampling.decode_latents(SimpleNamespace(vae=module), x)
    else:
        import open_clip
        module = open_clip.create_model("ViT-L-14" if part == "vitl" else "ViT-H-14").requires_grad_(False)
        x = torch.randn(1, 3, 224, 224, requires_grad=True)
        run = lambda: module.encode_image(x)
    params = sum(p.numel() for p in module.parameters())  # for CLIP: the whole model, as the rewards load it
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    if grad:
        mb = rise_mb(lambda: run().float().square().mean().backward())
    else:
        with torch.no_grad():
            mb = rise_mb(run)
    print(f"bench-sd-part {params} {trainable} {mb:.1f}", flush=True)


def sd_memory_table():
    """Each part in its own process (so memory freed by one cannot be reused by the next), with
    glibc's mmap threshold fixed so that freed tensors go back to the system instead of staying in
    the heap; then the recipes' estimates."""
    parts = {}
    for part, what in SD_PARTS.items():
        print(f"SD 1.5 memory: {what} ...", flush=True)
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        r = subprocess.run([sys.executable, "-c", f"import gpu_memory; gpu_memory.sd_part_memory({part!r})"],
                           capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.abspath(__file__)))
        line = [l for l in r.stdout.splitlines() if l.startswith("bench-sd-part ")]
        if r.returncode != 0 or not line:
            raise SystemExit(f"error: measuring the SD 1.5 {part} failed:\n{r.stderr[-2000:]}")
        n, trainable, mb = line[-1].split()[1:]
        parts[part] = dict(params=int(n), trainable=int(trainable), activation_gb=float(mb) / 1024)
    return dict(parts=parts, recipes=sd_recipes(parts))


def sd_recipes(parts):
    """The README recipes' memory per process from the measured parts: weights as the trainers hold
    them with --precision=bf16 (UNet, VAE and text encoder bf16; the LoRA fp32 with its gradient and
    AdamW's two moments, 16 bytes a weight; the reward's whole CLIP model fp32) + images per
    micro-batch x activations per image; the largest training micro-batch that fits 24, 40 and 80 GB;
    and evaluation's peak, EVAL_BATCH images at a time (their UNet calls, then their decode)."""
    gb = lambda n, bytes_each: n * bytes_each / 1024 ** 3
    from transformers import CLIPTextConfig, CLIPTextModel
    with torch.device("meta"):  # shapes only
        text_params = sum(p.numel() for p in CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER)).parameters())
    act = {p: v["activation_gb"] for p, v in parts.items()}
    n_lora = parts["unet"]["trainable"]
    eval_per_image = max(act["unet_eval"], act["vae_eval"])  # the UNet calls and the decode never overlap
    rows = []
    for reward, tower in (("aesthetic", "vitl"), ("pickscore", "vith")):
        w = (gb(parts["unet"]["params"] - n_lora + parts["vae"]["params"] + text_params, 2) + gb(n_lora, 16)
             + gb(parts[tower]["params"], 4))
        # DDPO: sampling and the reward run without gradient; training holds one UNet call's
        # activations per image of the micro-batch (README recipe: --train_batch_size=4)
        # AlignProp with checkpointing: one UNet call's activations at a time (recomputed in the backward
        # pass), plus the VAE decode's and the reward's, counted together (an upper bound: the reward's
        # are freed before the UNet's are rebuilt); README recipe: --batch_size=8
        for trainer, per_image, batch in (("DDPO", act["unet"], 4),
                                          ("AlignProp", act["unet"] + act["vae"] + act[tower], 8)):
            rows.append(dict(recipe=f"{trainer}, {reward}", weights_gb=w, per_image_gb=per_image, batch=batch,
                             total_gb=w + batch * per_image, eval_gb=w + EVAL_BATCH * eval_per_image,
                             fits={m: max(0, int((m - w) // per_image)) for m in (24, 40, 80)}))
    return rows


def markdown(sdmem):
    lines = ["SD 1.5, activation memory per image, measured on the CPU in the GPU's dtypes (random weights):", "",
             "| part | parameters | activations (GB) |", "|---|---:|---:|"]
    for p, v in sdmem["parts"].items():
        lines.append(f"| {SD_PARTS[p]} | {v['params']:,} | {v['activation_gb']:.2f} |")
    lines += ["", "Estimated GPU memory per process for the README's SD 1.5 recipes, --precision=bf16 "
              "(weights + images x activations):", "",
              "| recipe | weights (GB) | per image (GB) | images per micro-batch | training total (GB) | "
              f"evaluation, {EVAL_BATCH} images at a time (GB) | largest micro-batch in 24 / 40 / 80 GB |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for r in sdmem["recipes"]:
        fits = " / ".join(str(n) for n in r["fits"].values())
        lines.append(f"| {r['recipe']} | {r['weights_gb']:.1f} | {r['per_image_gb']:.2f} | {r['batch']} | "
                     f"**{r['total_gb']:.1f}** | {r['eval_gb']:.1f} | {fits} |")
    return lines
