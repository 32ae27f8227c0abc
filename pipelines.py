"""Where the text-to-image model comes from: the offline shapes world (shipped in shapes/pretrained/), a local
diffusers folder, or a Hugging Face hub id; returned as a `StableDiffusionPipeline` with a DDIM scheduler,
or, when the model's `model_index.json` names one, a `StableDiffusionXLPipeline` (DDIM too) or a
`StableDiffusion3Pipeline` (SD 3.5, a rectified-flow transformer: it keeps its flow-matching scheduler),
ready for sampling.py.
"""
import os

from plumbing import hub, mixed_precision
DEFAULT_HUB_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL_HUB_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
SD3_HUB_MODEL = "stabilityai/stable-diffusion-3.5-medium"


def _hub_folder(model, revision=None):
    """A local snapshot folder of hub `model` (at `revision`), or None if the hub is reachable and it
    may be downloaded. Offline and not cached: a one-line error at once (a hub lookup can hang here)."""
    folder = hub.snapshot(model, revision)
    if folder or hub.reachable():
        return folder
    at = f" at revision {revision!r}" if revision else ""
    raise ValueError(f"model {model!r}{at} is not in the Hugging Face cache and the hub is unreachable; "
                     f"download it where there is internet (`hf download {model}"
                     f"{f' --revision {revision}' if revision else ''}`) and copy the cache, "
                     "pass a local diffusers folder with --model=<folder>, or use --model=shapes")


def check_model(model, revision=None):
    """Where `model` will load from, without loading it: "shapes", a local folder, or a hub id's
    cached snapshot at `revision` (a branch, tag or commit; None = main), or the id, if the hub is
    reachable. A ValueError (one line) otherwise, at once: the scripts call this before anything
    slow, so a typo in --model or --revision costs nothing."""
    if model == "shapes" or os.path.isdir(model):
        if revision:
            raise ValueError(f"--revision={revision} pins a hub model's version, but {model!r} is "
                             f"{'the shapes world' if model == 'shapes' else 'a local folder'}, which has none; "
                             "drop --revision (or check the revision out into the folder)")
        return model
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        return _hub_folder(model, revision) or model
    raise ValueError(f"no diffusers folder at {model!r}; pass an existing folder, a hub id "
                     f"like {DEFAULT_HUB_MODEL}, or shapes")


def load_pipeline(model="shapes", device="cpu", precision="auto", revision=None, variant=None, t5=True):
    """A StableDiffusionPipeline, or the StableDiffusionXLPipeline or StableDiffusion3Pipeline the model
    is, from "shapes" (the offline world shipped in the repository), a hub id (e.g. DEFAULT_HUB_MODEL,
    SDXL_HUB_MODEL or SD3_HUB_MODEL) at `revision` (None = main) or a local diffusers folder; `variant`
    picks weight files such as *.fp16.safetensors (None = the plain ones). SD 1.5 and SDXL get a DDIM
    scheduler; SD 3.5 keeps its FlowMatchEulerDiscreteScheduler (sampling.step takes its flow step).
    SD 3.5 without its T5 encoder (`t5=False`): text_encoder_3 and tokenizer_3 are not loaded (several GB
    less), and the pipeline conditions on zeros in place of T5's tokens (sampling.encode_prompts does
    the same); other models ignore `t5`. Its parts are in the dtypes of `precision`
    (plumbing/mixed_precision.py: auto is bf16 on CUDA, fp32 on the CPU; the VAE never fp16, which is
    also what SDXL's VAE needs: it overflows in fp16, its pipeline's force_upcast). The VAE and text
    encoders are frozen; the trainers freeze the UNet (or transformer) when lora.inject adds its
    trainable fp32 weights. sampling.guided_eps runs it under autocast in its weights' dtype."""
    path = check_model(model, revision)
    if path == "shapes":
        from shapes import build as shapes_build  # imported only when the world is the model
        path = shapes_build.check_shipped()  # the world in the repository, checked file by file
    # after the checks: importing takes seconds
    from diffusers import (DDIMScheduler, DiffusionPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline,
                           StableDiffusionXLPipeline)
    dtypes = mixed_precision.pipeline_dtypes(precision, device)
    hub = revision if path == model else None  # a cached snapshot folder is already the revision; an id to download needs it
    try:
        index = DiffusionPipeline.load_config(path, revision=hub)  # model_index.json: the pipeline and its parts
        kind = index["_class_name"]
        if kind == "StableDiffusion3Pipeline":
            # T5 left out when asked, or when the folder was saved without it: its model_index.json entry is then
            # [null, null], which diffusers loads only when given text_encoder_3=None, tokenizer_3=None
            has_t5 = t5 and index.get("text_encoder_3", [None])[0]
            no_t5 = {} if has_t5 else dict(text_encoder_3=None, tokenizer_3=None)
            pipe = StableDiffusion3Pipeline.from_pretrained(path, dtype=dtypes, variant=variant, revision=hub, **no_t5)
        elif kind == "StableDiffusionXLPipeline":
            pipe = StableDiffusionXLPipeline.from_pretrained(path, dtype=dtypes, variant=variant, revision=hub)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(path, dtype=dtypes, safety_checker=None, feature_extractor=None,
                                                           requires_safety_checker=False, variant=variant, revision=hub)
    except (OSError, ValueError) as e:  # e.g. no files of that variant, or only variant files and no --variant
        raise ValueError(f"cannot load {model!r}{f' (variant {variant!r})' if variant else ''}: {str(e).splitlines()[0]}; "
                         "pass --variant=<name> if it holds only variant weight files (*.<name>.safetensors)")
    if kind != "StableDiffusion3Pipeline":  # SD 1.5 and SDXL sample with DDIM (sampling.ddim_step)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.vae.requires_grad_(False)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):  # those the model has (SD 1.5: one)
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).requires_grad_(False)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
