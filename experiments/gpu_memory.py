"""GPU memory of the Stable Diffusion 1.5, SDXL and SD 3.5 Medium recipes (docs/gpu.md, docs/sd3.md),
estimated on a machine with no GPU.

Random-weight modules of the models' exact shapes (the UNet with a rank-4 LoRA, the VAE decoder, and
the rewards' CLIP ViT-L/14 and ViT-H/14 image towers) run on the CPU in the dtypes the trainers use
on a GPU by default (--precision=bf16, plumbing/mixed_precision.py: the UNet's weights bf16 and its call
under bf16 autocast, through sampling.guided_eps itself; the VAE bf16, through
sampling.decode_latents; the reward model fp32), forward and backward, and forward alone as
sampling and evaluation run them, each in its own process; the rise of the process's peak resident
memory is the activation memory of one image. A recipe needs its weights + images per micro-batch x
activations per image.

SDXL's parts are too large for this machine: its UNet's bf16 weights alone are 4.8 GB, and one
image's activations at 1024 px more than that. So its UNet is built with weights that take no
memory (each parameter one number broadcast to its shape: what is kept for the backward pass does
not depend on the weights' values; tests/test_bench.py checks this against real weights), and the
UNet and the VAE decoder are measured at 32x32, 48x48 and 64x64 latents and extrapolated to SDXL's
128x128 along a straight line in the number of latent pixels (every activation kept is per pixel,
apart from the text side; the attention kernels keep no pixels x pixels matrix).

SD 3.5 Medium's transformer (2.2 billion weights, and a 0.2 billion-entry position table) is measured
the same way: weights that take no memory, its call through sampling.guided_eps with a rank-4 LoRA,
at 32x32, 48x48 and 64x64 latents (256, 576 and 1,024 image tokens + 333 text tokens, 77 CLIP + 256
T5), extrapolated to 128x128 (4,096 image tokens) along a line in the latent pixels: the text tokens
give the intercept, and the attention (PyTorch's SDPA: a flash kernel on the CPU, keeping a log-sum-exp
per query rather than a tokens x tokens matrix) adds no quadratic term, which the line's miss at the
three sizes checks. Its VAE (16 latent channels) is measured as SDXL's.

    python -m experiments.bench --trainers= --batch_sizes= --sd_memory     # minutes, at most ~7 GB of RAM
    python -m experiments.bench --trainers= --batch_sizes= --sdxl_memory   # minutes, at most ~7 GB of RAM
    python -m experiments.bench --trainers= --batch_sizes= --sd3_memory    # minutes, at most ~6 GB of RAM
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
SDXL_UNET = dict(  # SDXL base 1.0's unet/config.json (stabilityai/stable-diffusion-xl-base-1.0)
    sample_size=128, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(320, 640, 1280),
    layers_per_block=2, transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, downsample_padding=1,
    mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5)
# its vae/config.json is SD15_VAE's architecture (retrained, force_upcast); its text_encoder SD 1.5's
SDXL_TEXT_ENCODER_2 = dict(  # its text_encoder_2/config.json: OpenCLIP ViT-bigG/14's text tower
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
SD3_TRANSFORMER = dict(  # SD 3.5 Medium's transformer/config.json (stabilityai/stable-diffusion-3.5-medium)
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD3_VAE = dict(  # its vae/config.json: SD 1.5's VAE architecture with 16 latent channels and no quant convs
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
    use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)
# its text_encoder is SD 1.5's CLIP ViT-L/14 text tower with its projection, its text_encoder_2 SDXL's
SD3_T5 = dict(  # its text_encoder_3/config.json: T5 v1.1 XXL's encoder
    d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64, vocab_size=32128, feed_forward_proj="gated-gelu")
SD3_TEXT_TOKENS = 77 + sampling.T5_TOKENS  # the transformer's text sequence: the CLIPs' 77, then T5's 256
SDXL_SIZES = (32, 48, 64)  # latent sizes measured; SDXL's and SD 3.5's own, 128 (1024 px), is extrapolated
SD_PARTS = {  # what one image costs, with its batch: one CFG'd UNet call is 2 latents
    "unet": "UNet call, 2 x 4x64x64 latents (one image with CFG), bf16 autocast, fwd+bwd into LoRA",
    "vae": "VAE decode in bf16, 1 x 4x64x64 -> 512x512, fwd+bwd into the latent",
    "unet_eval": "the same UNet call without gradient (sampling, evaluation)",
    "vae_eval": "the same VAE decode without gradient (sampling, evaluation)",
    "vitl": "CLIP ViT-L/14 image tower (aesthetic) in fp32, 1 x 224x224, fwd+bwd into the image",
    "vith": "CLIP ViT-H/14 image tower (PickScore) in fp32, 1 x 224x224, fwd+bwd into the image",
}
SDXL_PARTS = {
    "xl_unet": "SDXL UNet call, 2 x 4x128x128 latents (one image with CFG), bf16 autocast, fwd+bwd into LoRA",
    "vae": "SDXL VAE decode in bf16, 1 x 4x128x128 -> 1024x1024, fwd+bwd into the latent",
    "xl_unet_eval": "the same UNet call without gradient (sampling, evaluation)",
    "vae_eval": "the same VAE decode without gradient (sampling, evaluation)",
    "vitl": SD_PARTS["vitl"], "vith": SD_PARTS["vith"],
}
SD3_PARTS = {
    "sd3": "SD 3.5 Medium transformer call, 2 x 16x128x128 latents (one image with CFG: 4,096 image + 333 text "
           "tokens each), bf16 autocast, fwd+bwd into LoRA",
    "vae": "SD 3.5 VAE decode in bf16, 1 x 16x128x128 -> 1024x1024, fwd+bwd into the latent",
    "sd3_eval": "the same transformer call without gradient (sampling, evaluation)",
    "vae_eval": SDXL_PARTS["vae_eval"], "vith": SD_PARTS["vith"],
}
MODEL_NAMES = {"sd15": "SD 1.5", "sdxl": "SDXL", "sd3": "SD 3.5"}
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


def broadcast_weights(module, dtype, seed=0):
    """Give a module built on the meta device weights of `dtype` that take no memory: each parameter
    one random number in (0, 1/fan_in) broadcast to its shape (a stride-0 view; 1/fan_in keeps the
    activations finite), each buffer zeros. Frozen: LoRA adds the trainable weights afterwards."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None:
                fan_in = p[0].numel() if p.ndim > 1 else 1
                value = (torch.rand((), generator=g, device="cpu") / fan_in).to(dtype)
                m._parameters[name] = torch.nn.Parameter(value.expand(p.shape), requires_grad=False)
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = torch.zeros((), dtype=b.dtype, device="cpu").expand(b.shape)
    return module


def sd_part_memory(part, size=64, model="sd15"):
    """Build `part` (random weights, on the CPU), then print its parameter count, its trainable ones
    and the peak resident memory its forward (+ backward, unless an _eval part) adds (MB), on `size`
    x `size` latents. `model` picks the VAE (SD 3.5's or the others'). Run in a fresh process (see measure)."""
    torch.manual_seed(0)
    grad = not part.endswith("_eval")
    buffers = 0
    if part.startswith("sd3"):
        from diffusers import SD3Transformer2DModel
        with torch.device("meta"):  # shapes only, as SDXL's UNet
            module = SD3Transformer2DModel(**SD3_TRANSFORMER)
        broadcast_weights(module, torch.bfloat16)
        buffers = sum(b.numel() for b in module.buffers())  # the position table, a weight of the checkpoint
        # SD 3.5's conditioning record (sampling.encode_prompts): the text sequence, both CLIPs' pooled vectors
        emb = dict(embeds=torch.randn(1, SD3_TEXT_TOKENS, 4096), pooled=torch.randn(1, 2048))
        lora.inject(module, rank=4)
        x = torch.randn(1, 16, size, size)
        run = lambda: sampling.guided_eps(module, x, 500, emb, emb, 4.5)
    elif part.startswith(("unet", "xl_unet")):
        from diffusers import UNet2DConditionModel
        if part.startswith("xl_"):
            with torch.device("meta"):  # shapes only: 2.6 billion weights would take 4.8 GB in bf16
                module = UNet2DConditionModel(**SDXL_UNET)
            broadcast_weights(module, torch.bfloat16)
            # SDXL's conditioning record (sampling.py): token states, pooled embedding, time ids
            emb = dict(embeds=torch.randn(1, 77, 2048), text_embeds=torch.randn(1, 1280),
                       time_ids=torch.full((1, 6), 8.0 * size))
        else:
            module = UNet2DConditionModel(**SD15_UNET).to(torch.bfloat16).requires_grad_(False)
            emb = torch.randn(1, 77, 768)
        lora.inject(module, rank=4)
        x = torch.randn(1, 4, size, size)
        run = lambda: sampling.guided_eps(module, x, 500, emb, emb, 5.0)  # the trainers' call, CFG batched
    elif part.startswith("vae"):  # SD 1.5's and SDXL's VAE share one architecture; SD 3.5's has 16 latent channels
        from diffusers import AutoencoderKL
        config = SD3_VAE if model == "sd3" else SD15_VAE
        module = AutoencoderKL(**config).to(torch.bfloat16).requires_grad_(False)
        x = torch.randn(1, config["latent_channels"], size, size, requires_grad=grad)
        run = lambda: sampling.decode_latents(SimpleNamespace(vae=module), x)
    else:
        import open_clip
        module = open_clip.create_model("ViT-L-14" if part == "vitl" else "ViT-H-14").requires_grad_(False)
        x = torch.randn(1, 3, 224, 224, requires_grad=True)
        run = lambda: module.encode_image(x)
    params = sum(p.numel() for p in module.parameters()) + buffers  # for CLIP: the whole model, as the rewards load it
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    if grad:
        mb = rise_mb(lambda: run().float().square().mean().backward())
    else:
        with torch.no_grad():
            mb = rise_mb(run)
    print(f"bench-sd-part {params} {trainable} {mb:.1f}", flush=True)


def measure(part, size=64, model="sd15"):
    """(parameters, trainable parameters, MB) of sd_part_memory in its own process (so memory freed
    by one part cannot be reused by the next), with glibc's mmap threshold fixed so that freed
    tensors go back to the system instead of staying in the heap."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    r = subprocess.run([sys.executable, "-c", f"from experiments import gpu_memory; gpu_memory.sd_part_memory({part!r}, {size}, {model!r})"],
                       capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    line = [l for l in r.stdout.splitlines() if l.startswith("bench-sd-part ")]
    if r.returncode != 0 or not line:
        raise SystemExit(f"error: measuring the {part} at {size}x{size} latents failed:\n{r.stderr[-2000:]}")
    n, trainable, mb = line[-1].split()[1:]
    return int(n), int(trainable), float(mb)


def sd_memory_table():
    """Each SD 1.5 part measured in its own process; then the recipes' estimates."""
    parts = {}
    for part, what in SD_PARTS.items():
        print(f"SD 1.5 memory: {what} ...", flush=True)
        n, trainable, mb = measure(part)
        parts[part] = dict(params=n, trainable=trainable, activation_gb=mb / 1024)
    return dict(parts=parts, recipes=sd_recipes(parts))


def line_fit(xs, ys):
    """Least-squares a + b x through the points: (a, b)."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def extrapolated_parts(described, model, target):
    """The denoiser and the VAE of `model`, with and without gradient, measured at SDXL_SIZES and
    extrapolated to `target` x `target` latents (a line in the number of latent pixels, its largest
    miss at the measured sizes kept as `fit_error`), the reward towers as for SD 1.5."""
    parts = {}
    for part, what in described.items():
        print(f"{MODEL_NAMES[model]} memory: {what} ...", flush=True)
        if part in ("vitl", "vith"):
            n, trainable, mb = measure(part)
            parts[part] = dict(params=n, trainable=trainable, activation_gb=mb / 1024)
            continue
        points = [(size, measure(part, size, model)) for size in SDXL_SIZES]
        a, b = line_fit([s * s for s, _ in points], [mb for _, (_, _, mb) in points])
        miss = max(abs(a + b * s * s - mb) / mb for s, (_, _, mb) in points)
        n, trainable, _ = points[0][1]
        parts[part] = dict(params=n, trainable=trainable, activation_gb=(a + b * target ** 2) / 1024,
                           measured_gb={s: mb / 1024 for s, (_, _, mb) in points}, fit_error=miss)
    return parts


def sdxl_memory_table():
    """SDXL's parts (extrapolated_parts, to 128x128 latents); then the recipes' estimates."""
    parts = extrapolated_parts(SDXL_PARTS, "sdxl", SDXL_UNET["sample_size"])
    return dict(parts=parts, recipes=sdxl_recipes(parts))


def sd3_memory_table():
    """SD 3.5 Medium's parts (extrapolated_parts, to 128x128 latents); then the recipes' estimates."""
    parts = extrapolated_parts(SD3_PARTS, "sd3", SD3_TRANSFORMER["sample_size"])
    return dict(parts=parts, recipes=sd3_recipes(parts))


def meta_params(build):
    """Parameters of the model that build() makes, counted on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        model = build()
    return sum(p.numel() for p in model.parameters())


def text_encoder_params(config, projection=False):
    """Parameters of a CLIP text tower of this config."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    return meta_params(lambda: (CLIPTextModelWithProjection if projection else CLIPTextModel)(CLIPTextConfig(**config)))


def t5_params(config=SD3_T5):
    """Parameters of a T5 encoder of this config (T5EncoderModel, as SD 3.5 loads it)."""
    from transformers import T5Config, T5EncoderModel
    return meta_params(lambda: T5EncoderModel(T5Config(**config, is_encoder_decoder=False)))


# The activations per image that docs/gpu.md's and docs/sd3.md's tables hold (GB; `python -m experiments.bench
# --trainers= --batch_sizes= --sd_memory --sdxl_memory --sd3_memory`), kept here so that experiments/gpu_check.py
# can hold a GPU run's peak against the estimate without measuring for minutes first; tests/test_gpu_check.py
# and tests/test_bench.py check that they are the tables' numbers.
MEASURED_GB = {"sd15": dict(unet=1.78, vae=2.99, unet_eval=0.18, vae_eval=0.61, vitl=0.26, vith=0.42),
               "sdxl": dict(xl_unet=12.23, vae=11.89, xl_unet_eval=0.28, vae_eval=2.39, vitl=0.26, vith=0.42),
               "sd3": dict(sd3=16.75, vae=11.64, sd3_eval=0.30, vae_eval=2.02, vith=0.43)}


def weights_gb(frozen, lora_params, reward_params=0):
    """The weights as the trainers hold them with --precision=bf16 (mixed_precision.pipeline_dtypes):
    the frozen UNet, VAE and text encoders bf16 (2 bytes a weight), the LoRA fp32 with its gradient
    and AdamW's two moments (16 bytes), the reward's model fp32 (4)."""
    return (2 * frozen + 16 * lora_params + 4 * reward_params) / 1024 ** 3


def training_gb(act, unet, trainer, tower=None, kl=False):
    """The activations one image of a training micro-batch keeps. DDPO (and PRDP, whose training
    makes the same UNet calls): one UNet call with gradient; with `kl` (DDPO's --kl_beta > 0) also the
    pretrained model's call without gradient, made while the first one's graph is held. AlignProp
    with checkpointing: one UNet call's (recomputed in the backward pass), the VAE decode's and the
    reward's (`tower`; None for a reward without a model), counted together (an upper bound: the
    reward's are freed before the UNet's are rebuilt). `act`: activation GB per part; `unet`: which
    part is the UNet."""
    if trainer == "AlignProp":
        return act[unet] + act["vae"] + (act[tower] if tower else 0.0)
    return act[unet] + (act[unet + "_eval"] if kl else 0.0)


def sampling_gb(act, unet):
    """The activations one image sampled and decoded without gradient keeps (sampling, evaluation):
    the UNet calls and the decode never overlap."""
    return max(act[unet + "_eval"], act["vae_eval"])


def recipes(parts, unet, text_params, batches, rewards=(("aesthetic", "vitl"), ("pickscore", "vith")), ranks=None,
            kl=()):
    """The GPU recipes' memory per process from the measured parts: weights as the trainers hold
    them with --precision=bf16 (mixed_precision.pipeline_dtypes: UNet, VAE and text encoders bf16;
    the LoRA fp32 with its gradient and AdamW's two moments, 16 bytes a weight; the reward's whole
    CLIP model fp32) + images per micro-batch x activations per image; the largest training
    micro-batch that fits 24, 40 and 80 GB; and evaluation's peak, EVAL_BATCH images at a time (their
    UNet calls, then their decode). `unet`: which part is the UNet (its forward-alone part is
    unet + "_eval"); `batches`: the recipes' images per micro-batch, {"DDPO": n, "AlignProp": n, ...}, one
    row per trainer and (reward, its CLIP tower) of `rewards`; `ranks`: a recipe's --lora_rank where it is
    not 4 (the parts' trainable count is rank 4's; a LoRA's size is linear in its rank); `kl`: the
    trainers whose recipe has a KL term (training_gb)."""
    act = {p: v["activation_gb"] for p, v in parts.items()}
    eval_per_image = sampling_gb(act, unet)
    rows = []
    for reward, tower in rewards:
        # DDPO (and PRDP): sampling and the reward run without gradient, training as training_gb says
        # (the recipe's --train_batch_size); AlignProp: the recipe's --batch_size
        for trainer, batch in batches.items():
            rank = (ranks or {}).get(trainer, 4)
            n_lora = parts[unet]["trainable"] * rank // 4
            w = weights_gb(parts[unet]["params"] - parts[unet]["trainable"] + parts["vae"]["params"] + text_params,
                           n_lora, parts[tower]["params"])
            per_image = training_gb(act, unet, trainer, tower, kl=trainer in kl)
            label = f"{trainer}, {reward}" + (f", LoRA rank {rank}" if rank != 4 else "") + (", KL" if trainer in kl else "")
            rows.append(dict(recipe=label, weights_gb=w, per_image_gb=per_image, batch=batch,
                             total_gb=w + batch * per_image, eval_gb=w + EVAL_BATCH * eval_per_image,
                             fits={m: max(0, int((m - w) // per_image)) for m in (24, 40, 80)}))
    return rows


def sd_recipes(parts):
    """SD 1.5's recipes (docs/gpu.md: --train_batch_size=4 for DDPO, --batch_size=8 for AlignProp)."""
    return recipes(parts, "unet", text_encoder_params(SD15_TEXT_ENCODER), batches=dict(DDPO=4, AlignProp=8))


def sdxl_recipes(parts):
    """SDXL's recipes (docs/gpu.md: --train_batch_size=2 for DDPO, --batch_size=1 for AlignProp), with its
    two text encoders. Its VAE is bf16 too: force_upcast asks only that it not be fp16, which
    mixed_precision never makes it."""
    text = text_encoder_params(SD15_TEXT_ENCODER) + text_encoder_params(SDXL_TEXT_ENCODER_2, projection=True)
    return recipes(parts, "xl_unet", text, batches=dict(DDPO=2, AlignProp=1))


def sd3_text_params(t5=True):
    """SD 3.5's text encoders: CLIP ViT-L/14's and OpenCLIP ViT-bigG/14's text towers with their
    projections, and T5-XXL's encoder unless --no-t5."""
    clips = text_encoder_params(SD15_TEXT_ENCODER, projection=True) + text_encoder_params(SDXL_TEXT_ENCODER_2, projection=True)
    return clips + (t5_params() if t5 else 0)


def sd3_recipes(parts):
    """SD 3.5 Medium's recipes (docs/sd3.md: DDPO --train_batch_size=2 at --lora_rank=32 with --kl_beta,
    AlignProp --batch_size=1, PRDP --train_batch_size=2; PickScore), with its three text encoders."""
    return recipes(parts, "sd3", sd3_text_params(), batches=dict(DDPO=2, AlignProp=1, PRDP=2),
                   rewards=(("pickscore", "vith"),), ranks=dict(DDPO=32), kl=("DDPO",))


def markdown(mem, model="SD 1.5"):
    if model == "SD 1.5":
        lines = ["SD 1.5, activation memory per image, measured on the CPU in the GPU's dtypes (random weights):", "",
                 "| part | parameters | activations (GB) |", "|---|---:|---:|"]
        for p, v in mem["parts"].items():
            lines.append(f"| {SD_PARTS[p]} | {v['params']:,} | {v['activation_gb']:.2f} |")
    else:
        sizes = " / ".join(f"{s}x{s}" for s in SDXL_SIZES)
        described, net = (SD3_PARTS, "transformer") if model == "SD 3.5" else (SDXL_PARTS, "UNet")
        lines = [f"{model}, activation memory per image, measured on the CPU in the GPU's dtypes (random weights; "
                 f"the {net} and VAE at {sizes} latents, then a line in the latent pixels through them, extrapolated "
                 "to 128x128):", "",
                 f"| part | parameters | measured at {sizes} (GB) | the line's largest miss | activations (GB) |",
                 "|---|---:|---:|---:|---:|"]
        for p, v in mem["parts"].items():
            measured = " / ".join(f"{gb:.2f}" for gb in v["measured_gb"].values()) if "measured_gb" in v else "-"
            miss = f"{v['fit_error']:.1%}" if "fit_error" in v else "-"
            lines.append(f"| {described[p]} | {v['params']:,} | {measured} | {miss} | {v['activation_gb']:.2f} |")
    page = "docs/sd3.md" if model == "SD 3.5" else "docs/gpu.md"
    lines += ["", f"Estimated GPU memory per process for the {model} recipes of {page}, --precision=bf16 "
              "(weights + images x activations):", "",
              "| recipe | weights (GB) | per image (GB) | images per micro-batch | training total (GB) | "
              f"evaluation, {EVAL_BATCH} images at a time (GB) | largest micro-batch in 24 / 40 / 80 GB |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for r in mem["recipes"]:
        fits = " / ".join(str(n) for n in r["fits"].values())
        lines.append(f"| {r['recipe']} | {r['weights_gb']:.1f} | {r['per_image_gb']:.2f} | {r['batch']} | "
                     f"**{r['total_gb']:.1f}** | {r['eval_gb']:.1f} | {fits} |")
    if model == "SD 3.5":
        t5 = t5_params()
        lines += ["", f"`--no-t5` leaves T5-XXL's encoder out: {t5:,} weights, {weights_gb(t5, 0):.1f} GB in bf16 off every "
                  "row's weights and totals (the activations stay: the transformer conditions on zeros for T5's tokens)."]
    return lines
