"""Mixed precision in one place: what `--precision` means for each part of the pipeline, the autocast
context every UNet call runs in, the loss scaler fp16 needs, and TF32 on CUDA.

    --precision   UNet (frozen weights; the UNet calls)   text encoders  VAE    LoRA, latents, DDIM, log-probs
    fp32          fp32                                    fp32           fp32   fp32
    bf16          bf16, under bf16 autocast                bf16           bf16   fp32
    fp16          fp16, under fp16 autocast + loss scaler  fp16           fp32   fp32
    auto          bf16 on CUDA, fp32 on the CPU
    (SD 3.5: its transformer is "the UNet" here; its text encoders, T5 included, are "text encoders".)

Only the UNet's arithmetic is lowered: sampling.guided_eps runs it under `autocast(unet)` and casts its
output to fp32, so the DDIM step (sampling.ddim_step) and its log-probs are fp32 and a recorded log-prob
and its recomputation differ only by the UNet's own rounding (DDPO's clip range is 1e-4 on SD 1.5;
bf16 keeps 8 bits of mantissa, a relative rounding of 4e-3, so nothing after the UNet may be bf16).
The trainable LoRA weights stay fp32 (lora.py). The VAE must not overflow: bf16 has fp32's exponent
range, fp16 tops out at 65504, so with fp16 the VAE stays fp32, and AlignProp's reward gradient, which
passes through it, is finite (and, scaled, does not underflow in the fp16 UNet). bf16 has fp32's range
for gradients too, so it needs no loss scaling (Micikevicius et al. 2018, "Mixed Precision Training",
Sec. 3.2: loss scaling for fp16; torch.amp.GradScaler implements it with a dynamic scale).
"""
import torch

from plumbing.configurator import require

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LOW = (torch.bfloat16, torch.float16)  # the dtypes the UNet runs under autocast in


def check(precision):
    """--precision, checked before any model work."""
    require(precision in ("auto", *DTYPES), f"--precision must be auto, fp32, bf16 or fp16, got {precision!r}")


def unet_dtype(precision, device):
    """The dtype the UNet computes in: --precision, with auto = bf16 on CUDA (A100/H100 run it at full
    speed, with fp32's range) and fp32 on the CPU (CPU autocast works, but gave no speed-up here)."""
    if precision == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return DTYPES[precision]


def pipeline_dtypes(precision, device):
    """The dtype of each pipeline part for --precision (the table above), as from_pretrained's `dtype`
    takes it. On CUDA it also lets the matmuls and convolutions left in fp32 (the reward model's; the VAE's
    with fp16) use TF32 (a 10-bit mantissa at several times fp32's speed on A100/H100 tensor cores),
    except with --precision=fp32, which is fp32 throughout (a reference to compare against)."""
    dtype = unet_dtype(precision, device)
    if torch.device(device).type == "cuda":
        tf32 = "ieee" if dtype == torch.float32 else "tf32"
        torch.backends.cuda.matmul.fp32_precision = tf32
        torch.backends.cudnn.conv.fp32_precision = tf32
    vae = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32  # fp16 would overflow; bf16 cannot
    return {"unet": dtype, "transformer": dtype, "text_encoder": dtype, "text_encoder_2": dtype,
            "text_encoder_3": dtype, "vae": vae, "default": torch.float32}


def autocast(unet):
    """The context a UNet call runs in: autocast to the dtype of the UNet's frozen weights when it is
    bf16 or fp16 (its matmuls and convolutions, the LoRA's included, run in that dtype; autocast keeps
    the ops that need the range, such as softmax and norms, in fp32 on CUDA), and a no-op for an fp32
    (or float64) UNet. The caller casts the output to fp32."""
    dtype = unet.dtype
    return torch.autocast(unet.device.type, dtype=dtype if dtype in LOW else torch.bfloat16, enabled=dtype in LOW)


def grad_scaler(unet):
    """fp16: a dynamic loss scaler (the loss is multiplied by a large scale before backward, so small
    gradients do not underflow in fp16; the gradients are divided back before clipping). Otherwise a
    disabled one, whose scale() and unscale_() do nothing and step() is optimizer.step()."""
    return torch.amp.GradScaler(unet.device.type, enabled=unet.dtype == torch.float16)


def backing_off(scaler):
    """fp16: is a non-finite gradient the loss scale's normal back-off? GradScaler starts with a large
    scale (65536) and halves it after every overflow (update()), skipping that step, so the first few
    fp16 updates overflow by design; only once the scale is down to 1 is an overflow a fault."""
    return scaler.is_enabled() and scaler.get_scale() > 1
