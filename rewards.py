"""Rewards: every reward behind one call, `fn = rewards.load(name)`, then `fn(images, prompts) -> [B]`.

images: float in [0, 1], [B, 3, H, W], any resolution; prompts: list[str], possibly with DiffExp's
phrase marks "a (dolphin) (riding a bike)", stripped here before any text model sees them.
Each fn carries `fn.name` and `fn.differentiable`. AlignProp back-propagates through the reward,
so a differentiable reward must keep the autograd graph intact: tensor-op preprocessing only (no
PIL, no uint8 rounding), no `no_grad` on the image path, and frozen weights so that the gradient
reaches the images without updating the reward model. DDPO only needs the numbers.

| name                     | what it is                                                   | grad |
|--------------------------|--------------------------------------------------------------|------|
| aesthetic                | LAION improved aesthetic predictor on CLIP ViT-L/14          | yes  |
| pickscore                | PickScore (Kirstain et al. 2023): ~100 * cos(image, text)    | yes  |
| jpeg_compressibility     | minus the JPEG size in kB at quality 95 (DDPO)               | no   |
| jpeg_incompressibility   | plus the JPEG size in kB at quality 95 (DDPO)                | no   |
| shapes_alignment         | the shapes world's judge: logit_scale * cos(image, caption)  | yes  |
| shapes_aesthetic         | the shapes world's learned appeal head on the judge          | yes  |
| shapes_appeal            | the shapes world's programmatic appeal (ground truth)        | yes* |
| shapes_correct           | the pixel checker: fraction of the caption drawn right       | no   |
| shapes_success           | the pixel checker: 1 if the whole caption is drawn right     | no   |

* soft tensor ops (shapes_world.appeal).

Without internet and without the weights cached, the hub-backed rewards raise RewardUnavailable
within seconds with one line naming the model, its size and the fix; the scripts exit non-zero.
"""
import io
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from plumbing import hub
# name -> differentiable; the trainers check this before loading anything heavy
REWARDS = {"aesthetic": True, "pickscore": True, "jpeg_compressibility": False,
           "jpeg_incompressibility": False, "shapes_alignment": True, "shapes_aesthetic": True,
           "shapes_appeal": True, "shapes_correct": False, "shapes_success": False}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the CLIP paper's normalisation (OpenAI CLIP)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# The published predictor weights (christophschuhmann/improved-aesthetic-predictor on GitHub)
AESTHETIC_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                 "sac%2Blogos%2Bava1-l14-linearMSE.pth")
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "diffexp")


class RewardUnavailable(RuntimeError):
    """A reward's weights are not here and cannot be fetched; the message says what to do."""


def strip_marks(prompt):
    """'a (dolphin) (riding a bike)' -> 'a dolphin riding a bike': the clean prompt of
    explore.parse_phrases. A plain regex, so rewards.py does not depend on explore.py."""
    return re.sub(r"[()]", "", prompt)


def require_differentiable(reward, trainer="AlignProp"):
    """Raise unless `reward` (a name or a loaded fn) is differentiable. Call it before sampling."""
    name = reward if isinstance(reward, str) else reward.name
    ok = REWARDS.get(name) if isinstance(reward, str) else reward.differentiable
    if not ok:
        grads = ", ".join(n for n, d in REWARDS.items() if d)
        raise ValueError(f"reward {name!r} is not differentiable, so {trainer} cannot back-propagate "
                         f"through it; train it with DDPO (python train_ddpo.py --reward={name}) "
                         f"or pick a differentiable reward: {grads}")


# ---------------------------------------------------------------- differentiable preprocessing

def clip_preprocess(images, size, crop=None, mean=OPENAI_MEAN, std=OPENAI_STD, mode="bicubic"):
    """CLIP's eval transform in tensor ops: resize the shorter side to `size`, centre-crop `crop`
    (default `size`), normalise. Mirrors torchvision's Resize(size)+CenterCrop on a PIL image (what
    open_clip and the CLIP processor run): PIL's bicubic is the a=-0.5 cubic with an antialiasing
    support that widens when shrinking, which is what torch computes with antialias=True (without
    it, 512->224 differs from PIL by up to ~50/255). PIL clips to [0, 255], so we clamp too."""
    crop = crop or size
    h, w = images.shape[-2:]
    if min(h, w) != size:
        long = int(size * max(h, w) / min(h, w))  # torchvision's rule for the longer side
        new = (size, long) if h <= w else (long, size)
        images = F.interpolate(images, size=new, mode=mode, align_corners=False, antialias=True)
        images = images.clamp(0, 1)
    h, w = images.shape[-2:]
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))  # torchvision's CenterCrop
    images = images[..., top:top + crop, left:left + crop]
    mean = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    std = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean) / std


def _frozen(model, device):
    # eval() turns off dropout (the aesthetic MLP has three); requires_grad_(False) keeps the
    # reward fixed while its gradient still flows back to the images
    return model.to(device).eval().requires_grad_(False)


def _named(fn, name, differentiable):
    fn.name, fn.differentiable = name, differentiable
    return fn


# ---------------------------------------------------------------- reward builders (take models)

def embedding_head_reward(encode_image, head, size, mean, std, name, device="cpu", mode="bicubic"):
    """reward = head(L2-normalised image embedding); prompts are ignored. The LAION aesthetic
    predictor and the shapes world's appeal head both have this shape."""
    dtype = next(head.parameters()).dtype

    def fn(images, prompts=None):
        x = clip_preprocess(images.to(device, dtype), size, mean=mean, std=std, mode=mode)
        e = encode_image(x)
        e = e / e.norm(dim=-1, keepdim=True)  # the predictor was trained on unit-norm embeddings
        return head(e).reshape(len(images)).float()
    return _named(fn, name, True)


class AestheticMLP(nn.Module):
    """The improved aesthetic predictor's MLP, 768-1024-128-64-16-1 with dropouts 0.2, 0.2, 0.1 and
    no activations (they are commented out in the LAION repo, so it is a linear map in effect).
    Held in `.layers` so the published state dict's keys (layers.0/2/4/6/7.weight|bias) load."""

    def __init__(self, input_size=768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(input_size, 1024), nn.Dropout(0.2),
                                    nn.Linear(1024, 128), nn.Dropout(0.2), nn.Linear(128, 64),
                                    nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


def aesthetic_reward(clip, mlp, device="cpu"):
    """`clip`: an open_clip CLIP model (ViT-L/14 for the real predictor); `mlp`: AestheticMLP()."""
    clip, mlp = _frozen(clip, device), _frozen(mlp, device)
    cfg = getattr(clip.visual, "preprocess_cfg", {})  # set by open_clip.create_model
    size = cfg.get("size", clip.visual.image_size)
    size = size if isinstance(size, int) else size[0]
    return embedding_head_reward(clip.encode_image, mlp, size, cfg.get("mean", OPENAI_MEAN),
                                 cfg.get("std", OPENAI_STD), "aesthetic", device,
                                 cfg.get("interpolation", "bicubic"))


def clip_image_embeds(model, pixel_values):
    """Projected image embedding of a transformers CLIPModel, spelled out: in transformers 5
    get_image_features returns an output object rather than the tensor."""
    return model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output)


def clip_text_embeds(model, input_ids, attention_mask):
    return model.text_projection(model.text_model(input_ids=input_ids,
                                                  attention_mask=attention_mask).pooler_output)


def clip_score_reward(model, tokenizer, size, crop, mean, std, name, device="cpu", mode="bicubic"):
    """reward = logit_scale.exp() * cos(image, text) for a transformers CLIPModel, per pair
    (PickScore's formula, the diagonal of its score matrix). Differentiable in the image only:
    the text side has no gradient to give, so it runs under no_grad."""
    model = _frozen(model, device)
    max_length = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)
    dtype = model.visual_projection.weight.dtype

    def fn(images, prompts):
        with torch.no_grad():
            tok = tokenizer([strip_marks(p) for p in prompts], padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt").to(device)
            t = clip_text_embeds(model, tok["input_ids"], tok["attention_mask"])
            t = t / t.norm(dim=-1, keepdim=True)
        x = clip_preprocess(images.to(device, dtype), size, crop, mean, std, mode)
        i = clip_image_embeds(model, x)
        i = i / i.norm(dim=-1, keepdim=True)
        return (model.logit_scale.exp() * (i * t).sum(-1)).float()
    return _named(fn, name, True)


def jpeg_kb(images, quality=95):
    """JPEG file size in kB (1000 bytes) of each image, at quality 95, as DDPO (Black et al. 2024)
    defines its compressibility reward. Encoding needs uint8 pixels: not differentiable."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


def jpeg_reward(sign, name):
    return _named(lambda images, prompts=None: sign * jpeg_kb(images), name, False)


# ---------------------------------------------------------------- loaders (fetch the weights)

def _need(what, fix, cached, host=None):
    """Fail fast, in one line, when `what` is neither cached nor downloadable (from `host`; default
    the hub)."""
    if not cached and not hub.reachable(host):
        raise RewardUnavailable(f"{what} not found locally and {host or 'the hub'} is unreachable "
                                f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}); {fix}")


def load_aesthetic(device="cpu", mlp_path=None, clip_model="ViT-L-14", clip_pretrained="openai",
                   clip=None, mlp=None):
    """The LAION aesthetic score. Pass `clip`/`mlp` objects (tests), or local files, or let it
    fetch: the CLIP weights from the hub through open_clip, the MLP from the LAION GitHub repo."""
    if clip is None:
        import open_clip
        tag = open_clip.get_pretrained_cfg(clip_model, clip_pretrained)  # {} for a file path
        what = f"aesthetic: CLIP {clip_model} '{clip_pretrained}' weights (~1.7 GB)"
        fix = "run once online to cache them, or pass clip_pretrained=<local open_clip checkpoint>"
        if tag.get("hf_hub"):
            repo = tag["hf_hub"].rstrip("/")
            _need(f"{what}, hub {repo},", fix,
                  hub.cached(repo, "open_clip_model.safetensors", "open_clip_pytorch_model.bin"))
        try:  # OpenAI's CLIP uses QuickGELU; a local file is taken to hold the OpenAI weights
            clip = open_clip.create_model(clip_model, pretrained=clip_pretrained,
                                          force_quick_gelu=tag.get("quick_gelu", False) if tag else True,
                                          require_pretrained=True)
        except Exception as e:
            raise RewardUnavailable(f"{what} failed to load ({str(e).splitlines()[0]}); {fix}") from e
    if mlp is None:
        mlp = AestheticMLP(clip.visual.output_dim)
        path = mlp_path or os.path.join(CACHE_DIR, "sac+logos+ava1-l14-linearMSE.pth")
        if not os.path.exists(path):
            fix = f"download {AESTHETIC_URL} and pass mlp_path=<file>, or run once online"
            if mlp_path:
                raise RewardUnavailable(f"aesthetic: mlp_path={mlp_path} does not exist; {fix}")
            _need("aesthetic: the predictor MLP sac+logos+ava1-l14-linearMSE.pth (3.7 MB)", fix,
                  False, host="github.com")
            os.makedirs(CACHE_DIR, exist_ok=True)
            try:  # download_url_to_file writes a temp file, then renames: no half files left
                torch.hub.download_url_to_file(AESTHETIC_URL, path)
            except Exception as e:
                raise RewardUnavailable(f"aesthetic: downloading the predictor MLP failed ({e}); {fix}") from e
        mlp.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return aesthetic_reward(clip, mlp, device)


def load_pickscore(device="cpu", model="yuvalkirstain/PickScore_v1",
                   processor="laion/CLIP-ViT-H-14-laion2B-s32B-b79K", revision=None):
    """PickScore: `model` a CLIPModel or its hub id / local folder (at `revision`, a branch, tag or
    commit of the hub id: `--reward_options=revision=<commit>` pins the weights); `processor` a
    CLIPProcessor (its tokenizer and image settings are used) or its hub id / local folder."""
    from transformers import CLIPModel, CLIPProcessor
    fix = "run once online to cache it, or pass model=/processor=<local folder>"
    names = f"{model if isinstance(model, str) else 'model'} / " \
            f"{processor if isinstance(processor, str) else 'processor'}"
    for obj, size, probe, rev in ((model, "~3.9 GB", "config.json", revision),
                                  (processor, "~4 MB", "preprocessor_config.json", None)):
        if isinstance(obj, str) and not os.path.isdir(obj):  # a hub id: cached or downloadable?
            _need(f"pickscore: {obj}{f' at revision {rev}' if rev else ''} ({size})", fix,
                  hub.cached(obj, probe, revision=rev))
    try:
        if isinstance(model, str):
            model = CLIPModel.from_pretrained(model, revision=revision)
        if isinstance(processor, str):
            processor = CLIPProcessor.from_pretrained(processor)
    except Exception as e:
        raise RewardUnavailable(f"pickscore: could not load {names} "
                                f"({str(e).splitlines()[0]}); {fix}") from e
    # offline, a hub tokenizer can come back nearly empty instead of raising: check its size
    if len(processor.tokenizer) != 49408:
        raise RewardUnavailable(f"pickscore: the tokenizer of {processor.tokenizer.name_or_path} "
                                f"has {len(processor.tokenizer)} tokens, not CLIP's 49408; {fix}")
    ip = processor.image_processor
    mode = "bilinear" if ip.resample == 2 else "bicubic"  # PIL's codes; CLIP processors use 3
    return clip_score_reward(model, processor.tokenizer, ip.size["shortest_edge"],
                             ip.crop_size["height"], ip.image_mean, ip.image_std, "pickscore",
                             device, mode)


def load_shapes(name, device="cpu", path=None, judge=None, head=None):
    """The shapes world's rewards, from its pixel readings (shapes/world.py) and its trained models
    (shapes/models.py, which owns the judge's input format): `shapes_alignment` (the judge's
    logit_scale * cos(image, caption), the world's PickScore), `shapes_aesthetic` (the appeal head on the judge's L2-normalised image
    embedding, the world's LAION predictor), `shapes_appeal` (the programmatic appeal the head
    imitates: the ground truth, to see over-optimisation) and `shapes_correct` (the pixel checker's
    fraction of colour/shape/background read as the prompt asks; `shapes_success`: 1 if all are, the
    success rate of a caption). `path`: the world's folder (built
    on first use); tests pass `judge`/`head` models instead."""
    from shapes import models as shapes_models
    from shapes import world as shapes_world
    if name == "shapes_appeal":
        return _named(lambda images, prompts=None: shapes_world.appeal(images).float(), name, True)
    if name in ("shapes_correct", "shapes_success"):
        def correct(images, prompts):  # the fraction of named attributes drawn right, or 1 if all are
            read = shapes_world.check(images)
            score = []
            for i, p in enumerate(prompts):
                named = shapes_world.parse_prompt(strip_marks(p))
                right = [int(read[k][i]) == w for k, w in zip(("colour", "shape", "background"), named) if w is not None]
                score.append(float(all(right)) if name == "shapes_success" else sum(right) / max(1, len(right)))
            return torch.tensor(score, device=images.device)
        return _named(correct, name, False)
    if judge is None or (head is None and name == "shapes_aesthetic"):
        if path is None:
            from shapes import build as shapes_build
            path = shapes_build.check_shipped()  # the world in the repository, checked file by file
    judge = _frozen(judge if judge is not None else shapes_models.load_judge(path, device), device)

    def image_embeds(images):  # no no_grad: the reward's gradient flows back to the images
        e = shapes_models.judge_image_features(judge, images.to(device, torch.float32))
        return e / e.norm(dim=-1, keepdim=True)

    if name == "shapes_alignment":
        tok = shapes_models.clip_tokenizer(shapes_models.MAX_TOKENS)

        def alignment(images, prompts):
            with torch.no_grad():  # the text side has no gradient to give
                ids = shapes_models.tokenize(tok, [strip_marks(p) for p in prompts]).to(device)
                t = shapes_models.judge_text_features(judge, ids)
                t = t / t.norm(dim=-1, keepdim=True)
            return (judge.logit_scale.exp() * (image_embeds(images) * t).sum(-1)).float()
        return _named(alignment, name, True)
    head = _frozen(head if head is not None else shapes_models.load_aesthetic(path, device), device)
    return _named(lambda images, prompts=None: head(image_embeds(images)).reshape(len(images)).float(), name, True)


def load(name, device="cpu", **options):
    """The one entry point: `fn = load("aesthetic"); r = fn(images, prompts)`. See REWARDS."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(REWARDS)}")
    if name == "aesthetic":
        return load_aesthetic(device, **options)
    if name == "pickscore":
        return load_pickscore(device, **options)
    if name.startswith("jpeg"):
        return jpeg_reward(-1.0 if name == "jpeg_compressibility" else 1.0, name, **options)
    return load_shapes(name, device, **options)
