"""Where the text-to-image model comes from: the offline shapes world (built on first use), a local
diffusers folder, or a Hugging Face hub id; always returned as a `StableDiffusionPipeline` with a
DDIM scheduler, ready for sampling.py.
"""
import os

import hub
import mixed_precision

DEFAULT_HUB_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


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


def load_pipeline(model="shapes", device="cpu", precision="auto"):
    """A StableDiffusionPipeline with a DDIM scheduler, from "shapes" (the offline world, built on
    first use), a hub id (e.g. DEFAULT_HUB_MODEL) or a local diffusers folder, its parts in the dtypes
    of `precision` (mixed_precision.py: auto is bf16 on CUDA, fp32 on the CPU; the VAE never fp16).
    The VAE and text encoder are frozen; the trainers freeze the UNet when lora.inject adds its
    trainable fp32 weights. sampling.guided_eps runs the UNet under autocast in its weights' dtype."""
    path = check_model(model)
    if path == "shapes":
        import shapes  # the world's build code: imported only when it is the model
        path = shapes.ensure_world()
    from diffusers import DDIMScheduler, StableDiffusionPipeline  # after the checks: importing takes seconds
    dtypes = mixed_precision.pipeline_dtypes(precision, device)
    pipe = StableDiffusionPipeline.from_pretrained(path, dtype=dtypes, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
