"""Building the offline "shapes" world: the tiny text-to-image model and its reward models,
trained on the world's synthetic images (shapes/world.py) and cached as a diffusers folder.

A reader without a GPU or hub access still gets a real Stable-Diffusion-shaped model: an
`AutoencoderKL`, a `CLIPTextModel` with the real CLIP tokenizer and a `UNet2DConditionModel`, saved
as a diffusers `StableDiffusionPipeline` folder, so every other script treats it exactly like SD 1.5.
Next to it: a tiny CLIP judge (the world's PickScore) and an aesthetic MLP on the judge's image
embedding (the world's LAION predictor), trained to predict a programmatic "appeal" score. The
models' architectures are in shapes/models.py; this file trains them in stages and caches the
result; shapes/measure.py measures it.

    python -m shapes.build                  # build the default world (cached), print its folder last
    python -m shapes.measure             # measure it: docs/shapes_world.md's quality and hard-prompt tables
"""
import glob
import hashlib
import json
import math
import os
import shutil
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from plumbing import configurator, runs
from shapes.models import (MAX_TOKENS, attribute_accuracy, clip_tokenizer, judge_image_features, judge_logits,
                           judge_read, judge_text_features, make_readable_by_transformers4, new_aesthetic, new_judge,
                           new_scheduler, new_text_encoder, new_unet, new_vae, save_pipeline, tokenize,
                           transformers4_files)
from shapes.world import CAPTIONS, RARE_CAPTIONS, appeal, make_batch

# ---------------------------------------------------------------------------------------------
# Build configuration: `python -m shapes.build --key=value` overrides these; ensure_world(**overrides)
# does the same from code. Each distinct configuration is built into its own cache folder.
seed = 0  # the whole build is deterministic given this seed (and the number of threads)
cache = ""  # folder of built worlds (default: $SHAPES_CACHE, else .cache/shapes in the repository)
micro = False  # a seconds-long build of the same code, for the tests (quality meaningless)
ship = False  # then write the built world into shapes/pretrained/, the world the project ships (see ship_world)
vae_steps = 1200  # autoencoder training steps
vae_batch = 16  # autoencoder batch size
judge_steps = 1000  # CLIP judge training steps
judge_batch = 128  # CLIP judge batch size
aesthetic_images = 8192  # images whose appeal the aesthetic MLP learns to predict
aesthetic_steps = 3000  # aesthetic MLP training steps (batch 256)
unet_steps = 1500  # denoiser training steps
unet_batch = 64  # denoiser batch size
unet_lr = 1e-3  # denoiser AdamW peak learning rate (cosine decay after a short warm-up)
ema = 0.999  # EMA decay of the saved denoiser weights
p_empty = 0.1  # fraction of empty captions, so classifier-free guidance has an unconditional model
p_high_t = 0.5  # fraction of training timesteps drawn from the noisy end (t >= 650)
# Hard prompts (shapes_world.RARE_PAIRS): rarity alone did not make them hard (never seen, they were
# still drawn right 0.90 of the time at guidance 5: the UNet composes colour and shape), so the rare
# pairs are also mostly mis-captioned in the denoiser's data, as web captions of rare things often are.
rare_weight = 0.25  # the denoiser sees each rare colour-shape pair this often relative to a common one (1 = uniform)
rare_wrong = 0.7  # and this fraction of those images shows the next shape under the rare pair's caption

BUILD_VERSION = 3  # bump when the build's code changes what it produces (invalidates caches)
MICRO = dict(vae_steps=2, vae_batch=4, judge_steps=2, judge_batch=8, aesthetic_images=256,
             aesthetic_steps=2, unet_steps=2, unet_batch=4)


def cosine_lr(step, total, peak, warmup=50):
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ---------------------------------------------------------------------------------------------
# The build, in stages. Each stage draws its data from its own generator, so changing one stage's
# length leaves the others' data unchanged.

def _generator(cfg, stage):
    return torch.Generator().manual_seed(cfg["seed"] * 1000 + stage)


def train_vae(cfg):
    """Stage 1: the autoencoder. Returns (vae, scaling_factor, PSNR in dB on held-out images)."""
    torch.manual_seed(cfg["seed"])
    vae, g = new_vae(), _generator(cfg, 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    for step in (bar := tqdm(range(cfg["vae_steps"]), desc="vae", dynamic_ncols=True)):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg["vae_steps"], 1e-3)
        x = make_batch(cfg["vae_batch"], g)[0] * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        # SD's autoencoder objective without its GAN and perceptual terms: reconstruction plus a
        # tiny KL pull towards N(0, 1) (Rombach et al. 2022, Sec. 3 and App. G)
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        x = make_batch(32 if cfg["micro"] else 512, _generator(cfg, 101))[0]
        mean = vae.encode(x * 2 - 1).latent_dist.mean
        recon = (vae.decode(mean).sample / 2 + 0.5).clamp(0, 1)
        psnr = (-10 * torch.log10(F.mse_loss(recon, x))).item()
    # The denoiser is trained on the posterior *mean*: sampled latents are about half noise at this
    # size. Scale it to unit variance, as SD's scaling_factor does (0.18215 for SD's VAE).
    return vae, 1.0 / mean.std().item(), psnr


def train_judge(cfg, vae):
    """Stage 2: the CLIP judge. Returns (judge, held-out accuracy per attribute).

    CLIP's contrastive loss, image-to-text half, with every caption of the world as the negatives
    (a batch repeats captions, so in-batch negatives would include false ones). Half of each batch
    goes through the autoencoder first, so the judge also knows what decoded images look like.
    """
    torch.manual_seed(cfg["seed"] + 1)
    judge, g, tok = new_judge(), _generator(cfg, 2), clip_tokenizer(MAX_TOKENS)
    ids = tokenize(tok, CAPTIONS)
    opt = torch.optim.AdamW(judge.parameters(), lr=1e-3, weight_decay=0.05)
    for step in (bar := tqdm(range(cfg["judge_steps"]), desc="judge", dynamic_ncols=True)):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg["judge_steps"], 1e-3)
        images, _, labels = make_batch(cfg["judge_batch"], g)
        half = cfg["judge_batch"] // 2
        with torch.no_grad():
            images[:half] = (vae.decode(vae.encode(images[:half] * 2 - 1).latent_dist.mean).sample / 2 + 0.5).clamp(0, 1)
        loss = F.cross_entropy(judge_logits(judge, images, judge_text_features(judge, ids)), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            judge.logit_scale.clamp_(0, math.log(100))  # as CLIP does
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    judge.eval().requires_grad_(False)
    images, _, labels = make_batch(32 if cfg["micro"] else 1024, _generator(cfg, 102))
    return judge, attribute_accuracy(judge_read(judge, tok, images), labels)


def train_aesthetic(cfg, judge):
    """Stage 3: the aesthetic MLP, regressing appeal() from the judge's image embedding.
    Returns (mlp, held-out correlation with appeal)."""
    torch.manual_seed(cfg["seed"] + 2)
    mlp, g = new_aesthetic(), _generator(cfg, 3)

    def embed(images):
        with torch.no_grad():
            return F.normalize(judge_image_features(judge, images), dim=-1)

    chunks = [make_batch(256, g)[0] for _ in range(max(1, cfg["aesthetic_images"] // 256))]
    x = torch.cat([embed(c) for c in chunks])
    y = torch.cat([appeal(c) for c in chunks])
    opt = torch.optim.AdamW(mlp.parameters(), lr=3e-3, weight_decay=0.0)
    steps = cfg["aesthetic_steps"]
    for step in tqdm(range(steps), desc="aesthetic", dynamic_ncols=True):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, 3e-3)
        i = torch.randint(len(x), (256,), generator=g)
        loss = F.mse_loss(mlp(x[i])[:, 0], y[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    mlp.eval().requires_grad_(False)
    test = make_batch(32 if cfg["micro"] else 1024, _generator(cfg, 103))[0]
    pred, truth = mlp(embed(test))[:, 0], appeal(test)
    return mlp, torch.corrcoef(torch.stack([pred, truth]))[0, 1].item()


def train_unet(cfg, vae, scaling_factor, judge):
    """Stage 4: the denoiser. Returns (unet with EMA weights, text encoder).

    As SD 1.5 conditions on a frozen, contrastively trained CLIP text encoder, this UNet conditions
    on the judge's text tower, frozen. Measured at 800 steps: shape agreement at guidance 5 of 0.65
    with it, 0.53 when a fresh text encoder trains together with the UNet.
    """
    torch.manual_seed(cfg["seed"] + 3)
    unet, text_encoder, scheduler = new_unet(), new_text_encoder(), new_scheduler()
    text_encoder.load_state_dict(judge.text_model.state_dict())
    text_encoder.eval().requires_grad_(False)
    tok, g = clip_tokenizer(MAX_TOKENS), _generator(cfg, 4)
    with torch.no_grad():  # every caption, and the empty one (last), encoded once
        captions = text_encoder(input_ids=tokenize(tok, CAPTIONS + [""])).last_hidden_state
    ema_params = [p.detach().clone() for p in unet.parameters()]
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg["unet_lr"], weight_decay=0.01)
    B, T = cfg["unet_batch"], scheduler.config.num_train_timesteps
    for step in (bar := tqdm(range(cfg["unet_steps"]), desc="unet", dynamic_ncols=True)):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg["unet_steps"], cfg["unet_lr"], warmup=100)
        images, _, labels = make_batch(B, g, cfg["rare_weight"], cfg["rare_wrong"])  # hard prompts: see shapes_world
        with torch.no_grad():
            latents = vae.encode(images * 2 - 1).latent_dist.mean * scaling_factor
        # the empty caption for a fraction of the batch: the unconditional model that classifier-free
        # guidance needs (Ho & Salimans 2022)
        labels = torch.where(torch.rand(B, generator=g) < cfg["p_empty"], len(CAPTIONS), labels)
        # Timesteps: uniform, except that a fraction comes from the noisy end, where the layout
        # (which shape, where) is decided; the prototype drew no shapes until it did this.
        t = torch.randint(T, (B,), generator=g)
        high = torch.randint(650, T, (B,), generator=g)
        t = torch.where(torch.rand(B, generator=g) < cfg["p_high_t"], high, t)
        noise = torch.randn(latents.shape, generator=g)
        noisy = scheduler.add_noise(latents, noise, t)
        target = scheduler.get_velocity(latents, noise, t)  # v = sqrt(a) eps - sqrt(1-a) x0 (Salimans & Ho 2022)
        loss = F.mse_loss(unet(noisy, t, captions[labels]).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(cfg["ema"], (1 + step) / (10 + step))  # EMA with warm-up
        torch._foreach_lerp_(ema_params, [p.detach() for p in unet.parameters()], 1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    with torch.no_grad():
        for p, e in zip(unet.parameters(), ema_params):
            p.copy_(e)
    return unet.eval().requires_grad_(False), text_encoder


# ---------------------------------------------------------------------------------------------
# The cache: one folder per build configuration. A folder is built under a temporary name and
# renamed into place only once complete, with a manifest of every file's SHA-256 written last; a
# folder whose manifest is missing or does not match its files is rebuilt, never loaded.
BUILD_KEYS = ("seed", "micro", "vae_steps", "vae_batch", "judge_steps", "judge_batch", "aesthetic_images",
              "aesthetic_steps", "unet_steps", "unet_batch", "unet_lr", "ema", "p_empty", "p_high_t", "rare_weight", "rare_wrong")
MANIFEST = "world.json"
# How the folder is saved, apart from what is trained (so not a build key: a new format re-saves a
# cached world, see migrate, instead of retraining it). 1: as transformers 5 saves it; 2: in the
# form transformers 4.x reads too (shapes_models.save_pipeline).
SAVE_FORMAT = 2


# what each build option allows, checked before anything is built: (test, the allowed values in words)
ALLOWED = {"seed": (lambda v: 0 <= v < 2**32, "between 0 and 2**32 - 1"),
           **{k: (lambda v: v >= 1, ">= 1") for k in ("vae_steps", "vae_batch", "judge_steps", "judge_batch",
                                                    "aesthetic_images", "aesthetic_steps", "unet_steps", "unet_batch")},
           "unet_lr": (lambda v: v > 0, "> 0"),
           "ema": (lambda v: 0 <= v < 1, "in [0, 1)"),
           "p_empty": (lambda v: 0 <= v < 1, "in [0, 1) (1 would leave no captioned images)"),
           "p_high_t": (lambda v: 0 <= v <= 1, "in [0, 1]"),
           "rare_weight": (lambda v: 0 <= v <= 1, "in [0, 1] (1 = uniform, 0 = never)"),
           "rare_wrong": (lambda v: 0 <= v <= 1, "in [0, 1] (a fraction of the rare pairs' images)")}


def build_config(**overrides):
    """The build configuration: this file's defaults, the micro sizes if micro=True, then overrides.
    An unknown option or a value outside ALLOWED is a ValueError (one line), before any work."""
    unknown = set(overrides) - set(BUILD_KEYS) - {"cache"}
    if unknown:
        raise ValueError(f"unknown shapes build option(s) {sorted(unknown)}; known: {', '.join(BUILD_KEYS)}, cache")
    cfg = {k: globals()[k] for k in BUILD_KEYS + ("cache",)}
    if overrides.get("micro", cfg["micro"]):
        cfg.update({k: v for k, v in MICRO.items() if k in cfg})
    cfg.update(overrides)
    for key, (ok, allowed) in ALLOWED.items():
        if not ok(cfg[key]):
            raise ValueError(f"--{key} must be {allowed}, got {cfg[key]!r}")
    return cfg


def world_dir(cfg):
    """Where the world built with `cfg` lives: named by the seed and a hash of the configuration."""
    root = cfg["cache"] or os.environ.get("SHAPES_CACHE") or os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "shapes")
    key = json.dumps({k: cfg[k] for k in BUILD_KEYS} | {"version": BUILD_VERSION}, sort_keys=True)
    name = f"{'micro' if cfg['micro'] else 'world'}-seed{cfg['seed']}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    return os.path.join(root, name)


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs
                  if f != MANIFEST)


def mismatch(folder):
    """What in `folder` differs from its manifest, in words naming the first bad file; None if every
    file the manifest lists is there with its SHA-256 and no other file is."""
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            files = dict(json.load(f)["files"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"has no readable {MANIFEST} in {folder} ({type(e).__name__})"
    for rel, sha in sorted(files.items()):
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            return f"is missing {os.path.relpath(path)}"
        if _sha256(path) != sha:
            return (f"has {os.path.relpath(path)}, not the file its manifest lists ({os.path.getsize(path)} bytes; "
                    "changed, truncated or a Git LFS pointer)")
    if extra := sorted(set(_files(folder)) - set(files)):
        return f"holds a file its manifest does not list: {os.path.relpath(os.path.join(folder, extra[0]))} (remove it)"
    return None


def is_complete(folder):
    """True if `folder` holds a finished build in today's save format: a manifest whose file list
    and hashes all match."""
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            if json.load(f).get("save_format", 1) != SAVE_FORMAT:
                return False
    except (OSError, ValueError, AttributeError):
        return False
    return mismatch(folder) is None


def migrate(folder):
    """Re-save a world built in save format 1 in today's format, in place, without retraining it:
    the text encoder's weights renamed, the tokenizer's vocab.json and merges.txt added, then the
    manifest. Only if every other file is still the one its manifest lists; a migration cut short
    is finished by the next call. True if `folder` is now complete."""
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            manifest = json.load(f)
        if manifest.get("save_format", 1) != 1:
            return False
        files, owned = manifest["files"], set(transformers4_files(folder))
        if not (set(files) - owned <= set(_files(folder)) <= set(files) | owned
                and all(_sha256(os.path.join(folder, p)) == h for p, h in files.items() if p not in owned)):
            return False
        make_readable_by_transformers4(folder)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    manifest.update(save_format=SAVE_FORMAT, files={p: _sha256(os.path.join(folder, p)) for p in _files(folder)})
    runs.write_text(os.path.join(folder, MANIFEST), json.dumps(manifest, indent=1))
    print(f"shapes: {folder} re-saved in the form transformers 4.x reads too (save format {SAVE_FORMAT})",
          file=sys.stderr)
    return is_complete(folder)


def ensure_world(**overrides):
    """The folder of the world built with this configuration, building it first if it is missing
    or incomplete. Safe to call from several processes at once (a file lock lets one build)."""
    import fcntl
    cfg = build_config(**overrides)
    folder = world_dir(cfg)
    if is_complete(folder):
        return folder
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    with open(folder + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not is_complete(folder) and not migrate(folder):  # another process may have built it while we waited
            if os.path.exists(folder):
                print(f"shapes: {folder} is incomplete or corrupt; rebuilding it", file=sys.stderr)
                shutil.rmtree(folder)
            for stale in glob.glob(folder + ".tmp*"):  # left by a build that was killed
                shutil.rmtree(stale, ignore_errors=True)
            tmp = f"{folder}.tmp{os.getpid()}"
            build(tmp, cfg)
            os.rename(tmp, folder)
    return folder


# ---------------------------------------------------------------------------------------------
# The shipped world: the default world is not built on the user's machine but read from the
# repository, as a model release's weights are, so every machine trains on the same world (builds
# differ from CPU to CPU in the last digits, and 1,500 training steps grow those digits into another
# world). `python -m shapes.build --ship` regenerates it from a build (ship_world); it stores nothing twice.
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")
SHIPPED_LEFT_OUT = ("tokenizer/tokenizer.json",)  # transformers rebuilds it from vocab.json and merges.txt


def manifest_hash(folder):
    """The world's identity: the SHA-256 of its manifest's file list (every file's own SHA-256), the
    same on every machine for the same weights; None if `folder` is not a shapes world."""
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def check_shipped(folder=None):
    """The shipped world's folder, once every file its manifest lists is there with its SHA-256 and
    nothing else is; otherwise a ValueError of one line naming the first bad file and how to
    restore it (a Git LFS pointer or a partial checkout shows up here, before anything is written).
    `folder`: SHIPPED by default."""
    folder = folder or SHIPPED
    if problem := mismatch(folder):
        raise ValueError(f"the shipped shapes world {problem}; restore it with `git checkout -- "
                         f"{os.path.relpath(folder)}` (with Git LFS: `git lfs pull`), or clone the repository again")
    return folder


def ship_world(source, dest=None):
    """Write built world `source` into `dest` in the shipped form: every file but SHIPPED_LEFT_OUT,
    and the judge without its text tower, which is the pipeline's text encoder (the denoiser is
    conditioned on the judge's text tower, frozen: train_unet), so it is stored once and
    shapes_models.load_judge puts it back. Its world.json keeps the build's configuration and
    measured quality, adds the commit that built it, and lists the shipped files' SHA-256."""
    import subprocess
    from safetensors.torch import load_file, save_file
    dest = dest or SHIPPED
    with open(os.path.join(source, MANIFEST)) as f:
        manifest = json.load(f)
    tmp = f"{dest}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(MANIFEST))
    for rel in SHIPPED_LEFT_OUT:
        os.remove(os.path.join(tmp, rel))
    judge_file = os.path.join(tmp, "judge", "model.safetensors")
    judge, text = load_file(judge_file), load_file(os.path.join(tmp, "text_encoder", "model.safetensors"))
    tower = {k: v for k, v in judge.items() if k.startswith("text_model.")}
    if tower.keys() != text.keys() or any(not torch.equal(v, text[k]) for k, v in tower.items()):
        raise SystemExit(f"error: {source}: the judge's text tower is not the text encoder; cannot store it once")
    save_file({k: v for k, v in judge.items() if k not in tower}, judge_file, metadata={"format": "pt"})
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True).stdout.strip()
    manifest.update(built_from=os.path.basename(source), commit=git("rev-parse", "HEAD") or "unknown",
                    commit_dirty=bool(git("status", "--porcelain", "--untracked-files=no")),
                    files={p: _sha256(os.path.join(tmp, p)) for p in _files(tmp)})
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(tmp, dest)
    return dest


def build(folder, cfg):
    """Train every part of the world and save it into `folder` (see ensure_world for the cache)."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file
    times, start = {}, time.time()
    vae, scaling_factor, psnr = train_vae(cfg)
    times["vae"] = time.time() - start
    judge, judge_accuracy = train_judge(cfg, vae)
    times["judge"] = time.time() - start - sum(times.values())
    aesthetic, aesthetic_corr = train_aesthetic(cfg, judge)
    times["aesthetic"] = time.time() - start - sum(times.values())
    unet, text_encoder = train_unet(cfg, vae, scaling_factor, judge)
    times["unet"] = time.time() - start - sum(times.values())
    vae.register_to_config(scaling_factor=scaling_factor)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(MAX_TOKENS),
                                   unet=unet, scheduler=new_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    save_pipeline(pipe, folder)  # in the form transformers 4.x reads too
    judge.save_pretrained(os.path.join(folder, "judge"))
    os.makedirs(os.path.join(folder, "aesthetic"))
    save_file(aesthetic.state_dict(), os.path.join(folder, "aesthetic", "model.safetensors"))
    times["save"] = time.time() - start - sum(times.values())
    times["total"] = time.time() - start
    manifest = dict(config={k: cfg[k] for k in BUILD_KEYS}, version=BUILD_VERSION, save_format=SAVE_FORMAT,
                    rare_captions=RARE_CAPTIONS if cfg["rare_weight"] < 1 or cfg["rare_wrong"] > 0 else [],
                    vae_psnr_db=round(psnr, 2), scaling_factor=scaling_factor,
                    judge_accuracy=judge_accuracy, aesthetic_correlation=round(aesthetic_corr, 4),
                    seconds={k: round(v, 1) for k, v in times.items()}, threads=torch.get_num_threads(),
                    files={p: _sha256(os.path.join(folder, p)) for p in _files(folder)})
    with open(os.path.join(folder, MANIFEST), "w") as f:  # last: its presence marks a finished build
        json.dump(manifest, f, indent=1)
    print("shapes: stage seconds " + ", ".join(f"{k} {v:.0f}" for k, v in times.items())
          + f" | VAE {psnr:.1f} dB, judge accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in judge_accuracy.items())
          + f", aesthetic r={aesthetic_corr:.3f}", file=sys.stderr)


if __name__ == "__main__":
    defaults = {k: globals()[k] for k in BUILD_KEYS + ("cache",)}
    config = configurator.configure(globals())
    overrides = {k: config[k] for k, v in defaults.items() if config[k] != v}
    try:
        build_config(**overrides)  # checks first: a bad option costs nothing
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    configurator.require(not (ship and micro), "--ship writes the world the project ships: not a --micro one")
    world = ensure_world(**overrides)
    with open(os.path.join(world, MANIFEST)) as f:
        seconds = json.load(f)["seconds"]
    print("stage seconds (when built): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    if ship:
        world = ship_world(world)
        print(f"shipped: {os.path.relpath(world)} ({sum(os.path.getsize(os.path.join(world, p)) for p in _files(world)) / 1e6:.1f} MB, "
              f"world {manifest_hash(world)[:12]})")
    print(world)
