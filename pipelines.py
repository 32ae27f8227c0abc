"""Where the text-to-image model comes from: the offline shapes world (built on first use), a local
diffusers folder, or a Hugging Face hub id; returned as a `StableDiffusionPipeline`, or a
`StableDiffusionXLPipeline` when the model's `model_index.json` names one, with a DDIM scheduler,
ready for sampling.py.
"""
import os

import torch

import hub

DEFAULT_HUB_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL_HUB_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"


def _hub_folder(model):
    """A local snapshot folder of hub `model`, or None if the hub is reachable and it may be
    downloaded. Offline and not cached: a one-line error at once (a hub lookup can hang here)."""
    folder = hub.snapshot(model)
    if folder or hub.reachable():
        return folder
    raise ValueError(f"model {model!r} is not in the Hugging Face cache and the hub is unreachable; "
                     f"download it where there is internet (`hf download {model}`) and copy the cache, "
                     "pass a local diffusers folder with --model=<folder>, or use --model=shapes")


def check_model(model):
    """Where `model` will load from, without loading it: "shapes", a local folder, or a hub id's
    cached snapshot (or the id, if the hub is reachable). A ValueError (one line) otherwise, at once:
    the scripts call this before anything slow, so a typo in --model costs nothing."""
    if model == "shapes" or os.path.isdir(model):
        return model
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        return _hub_folder(model) or model
    raise ValueError(f"no diffusers folder at {model!r}; pass an existing folder, a hub id "
                     f"like {DEFAULT_HUB_MODEL}, or shapes")


def load_pipeline(model="shapes", device="cpu", dtype=None):
    """A StableDiffusionPipeline (or StableDiffusionXLPipeline, if the model is one) with a DDIM
    scheduler, from "shapes" (the offline world, built on first use), a hub id (e.g.
    DEFAULT_HUB_MODEL, or SDXL_HUB_MODEL) or a local diffusers folder. The VAE and text encoder(s) are
    frozen and in `dtype` (fp16 on CUDA, fp32 on CPU by default); the UNet stays fp32 because the
    trainers attach their trainable LoRA weights to it (run it under autocast on GPU). SDXL's VAE is
    kept in fp32 when its config says force_upcast (it overflows in fp16, see below)."""
    path = check_model(model)
    if path == "shapes":
        import shapes  # the world's build code: imported only when it is the model
        path = shapes.ensure_world()
    # after the checks: importing takes seconds
    from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
    if dtype is None:
        dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    sdxl = DiffusionPipeline.load_config(path)["_class_name"] == "StableDiffusionXLPipeline"
    if sdxl:
        pipe = StableDiffusionXLPipeline.from_pretrained(path, dtype=dtype)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(path, dtype=dtype, safety_checker=None,
                                                       feature_extractor=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.unet.float()
    if sdxl and pipe.vae.config.force_upcast:
        # SDXL's VAE overflows in fp16 (inf, then NaN images), so its pipeline upcasts it to fp32 to
        # decode when the config says force_upcast. We keep it in fp32 throughout (0.3 GB more, and
        # AlignProp back-propagates through the decode). A VAE made for fp16, such as
        # madebyollin/sdxl-vae-fp16-fix (force_upcast false), stays in `dtype`. SD 1.5's pipeline
        # ignores the flag (every AutoencoderKL has it, default true), so SD 1.5 is left as it was.
        pipe.vae.float()
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    if sdxl:
        pipe.text_encoder_2.requires_grad_(False)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
