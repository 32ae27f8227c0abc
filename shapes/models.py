"""The shapes world's tiny models: small versions of Stable Diffusion 1.5's three parts (an
`AutoencoderKL`, a `CLIPTextModel` with the real CLIP tokenizer, a `UNet2DConditionModel` and a DDIM
scheduler), the CLIP judge (the world's PickScore) and the aesthetic MLP on the judge's image
embedding (the world's LAION predictor): their architectures, how the judge reads an image, and
loading the trained judge and MLP from a built world folder. shapes/build.py trains them.
"""
import functools
import glob
import gzip
import importlib.util
import json
import os

import torch
import torch.nn.functional as F
from transformers import CLIPTokenizer

from plumbing.runs import atomic_write, write_text
from shapes.world import BACKGROUNDS, CAPTIONS, COLOURS, SHAPES, SIZE, to_world_size

# ---------------------------------------------------------------------------------------------
# The real CLIP tokenizer, offline.

@functools.lru_cache(maxsize=1)
def _clip_bpe():
    """CLIP's vocabulary and merges, read from the file that ships inside open_clip (the file only:
    importing open_clip itself costs seconds, as it imports torchvision)."""
    package = importlib.util.find_spec("open_clip").submodule_search_locations[0]
    lines = gzip.open(os.path.join(package, "bpe_simple_vocab_16e6.txt.gz")).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]  # as open_clip/CLIP read it
    # CLIP's (GPT-2's) 256 base symbols, in vocabulary order: the printable bytes as themselves,
    # then the other bytes, in byte order, as the characters from U+0100 up
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab)}, merges


def clip_tokenizer(model_max_length=77):
    """The real CLIP BPE tokenizer (49408 tokens, as SD 1.5's), built offline from the vocabulary
    that ships inside open_clip. transformers 5 needs `vocab=`/`merges=` (the old `vocab_file=`
    names are silently ignored and give garbage ids)."""
    vocab, merges = _clip_bpe()
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)
    assert len(tok) == 49408, len(tok)
    return tok


# ---------------------------------------------------------------------------------------------
# Saving a pipeline folder that transformers 4.x reads as transformers 5 does. Many users still pin
# 4.x, and two parts of what transformers 5 saves read differently there: CLIPTextModel's weights
# come without the `text_model.` prefix (5.x dropped that wrapper module; 4.x then finds none of
# its weights and initialises them all at random, with only a warning), and the tokenizer comes
# as tokenizer.json alone, which 4.x's slow CLIPTokenizer (the class model_index.json names)
# cannot read: it reads vocab.json and merges.txt. transformers 5 reads both forms.
TEXT_MODEL_PREFIX = "text_model."
MERGES_HEADER = "#version: 0.2"  # 4.x's CLIPTokenizer skips the first line of merges.txt


def save_pipeline(pipe, folder):
    """pipe.save_pretrained(folder), in the form both transformers lines read."""
    pipe.save_pretrained(folder)
    make_readable_by_transformers4(folder)


def _text_encoder_weights(folder):
    """The weight files of the folder's CLIPTextModel text encoders (a variant's too)."""
    found = []
    for config in sorted(glob.glob(os.path.join(folder, "text_encoder*", "config.json"))):
        with open(config) as f:
            if json.load(f).get("architectures") == ["CLIPTextModel"]:
                found += sorted(glob.glob(os.path.join(os.path.dirname(config), "model*.safetensors")))
    return found


def transformers4_files(folder):
    """The files of pipeline folder `folder` whose form transformers 4.x needs (relative paths):
    its CLIPTextModel weight files and, beside each tokenizer.json, vocab.json and merges.txt."""
    tokenizers = sorted(os.path.dirname(t) for t in glob.glob(os.path.join(folder, "tokenizer*", "tokenizer.json")))
    paths = _text_encoder_weights(folder) + [os.path.join(t, n) for t in tokenizers for n in ("vocab.json", "merges.txt")]
    return [os.path.relpath(p, folder) for p in paths]


def unreadable_by_transformers4(folder):
    """Those of transformers4_files(folder) that are missing or in the form only 5.x reads."""
    from safetensors import safe_open
    bad = []
    for rel in transformers4_files(folder):
        path = os.path.join(folder, rel)
        if not os.path.exists(path):
            bad.append(rel)
        elif path.endswith(".safetensors"):
            with safe_open(path, "pt") as f:
                if not all(k.startswith(TEXT_MODEL_PREFIX) for k in f.keys()):
                    bad.append(rel)
    return bad


def make_readable_by_transformers4(folder):
    """Rewrite, in place, what transformers4_files(folder) lists and 4.x cannot read yet: the text
    encoder's weights under `text_model.` names (the same tensors), vocab.json and merges.txt from
    tokenizer.json (the same vocabulary and merges). Each file is written atomically; a file already
    in the right form is left alone. Returns transformers4_files(folder)."""
    from safetensors.torch import load_file, save_file
    for rel in unreadable_by_transformers4(folder):
        path = os.path.join(folder, rel)
        if path.endswith(".safetensors"):
            weights = {k if k.startswith(TEXT_MODEL_PREFIX) else TEXT_MODEL_PREFIX + k: v
                       for k, v in load_file(path).items()}
            atomic_write(path, lambda tmp: save_file(weights, tmp, metadata={"format": "pt"}))
            continue
        with open(os.path.join(os.path.dirname(path), "tokenizer.json"), encoding="utf-8") as f:
            bpe = json.load(f)["model"]
        if rel.endswith("vocab.json"):
            write_text(path, json.dumps(bpe["vocab"]))
        else:  # merges are pairs ["a", "b"] in newer tokenizer.json files, "a b" in older ones
            write_text(path, "\n".join([MERGES_HEADER] + [m if isinstance(m, str) else " ".join(m)
                                                          for m in bpe["merges"]]) + "\n")
    return transformers4_files(folder)


# ---------------------------------------------------------------------------------------------
# The models. Small versions of SD 1.5's three parts, plus the judge. Prompts are 16 tokens, not
# 77: the world's captions are at most 11 tokens, and 77 tokens cost ~30% of the UNet's time.
MAX_TOKENS = 16
TEXT = dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=64,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def new_vae():
    # x2 down to a 16x16x4 latent; x4 variants lost colour or shape. No mid-block attention.
    # (x4 to 8x8x8, measured: the UNet's training step 2.4-2.5x cheaper on 8x8 latents, but after the
    # same 1500 steps common captions got their shape at guidance 5 0.54-0.78 of the time by the
    # pixel checker, against 0.97 with this autoencoder.)
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=8, sample_size=SIZE, mid_block_add_attention=False)


def new_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel
    return CLIPTextModel(CLIPTextConfig(**TEXT))


def new_unet():
    # Cross-attention at 8x8 and 4x4 (and the 4x4 mid block), none at 16x16. Note diffusers'
    # historical naming: `attention_head_dim` here is the number of heads (2 heads of 32 channels).
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64),
        layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT["hidden_size"], attention_head_dim=2, norm_num_groups=16)


def new_scheduler():
    # v-prediction with the cosine schedule (Nichol & Dhariwal 2021), whose last timestep has
    # (almost) zero SNR: SD's scaled-linear schedule leaves much of the image visible at t=999 for a
    # 16x16 latent, and epsilon-prediction then blew up. Sample with "trailing" DDIM timesteps so
    # sampling starts at t=999 (Lin et al. 2024, "Common diffusion noise schedules are flawed").
    from diffusers import DDIMScheduler
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                         prediction_type="v_prediction", timestep_spacing="trailing",
                         clip_sample=False, set_alpha_to_one=True, steps_offset=1)


def new_judge():
    # A tiny CLIP (Radford et al. 2021): a ViT on 8x8 patches (16 of them; 4x4 patches were 5x slower
    # for the same held-out accuracy) and a 2-layer text transformer.
    from transformers import CLIPConfig, CLIPModel
    return CLIPModel(CLIPConfig(text_config=TEXT, projection_dim=64, vision_config=dict(
        image_size=SIZE, patch_size=8, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4)))


def new_aesthetic():
    # A small MLP on the judge's L2-normalised image embedding, as the LAION predictor is an MLP on
    # CLIP's. (The embedding keeps what matching a caption needs and drops much of the size and
    # position that appeal depends on: held-out correlation 0.73 here, against 0.91 measured for the
    # judge's pooled and mean patch features. An imperfect learned reward is the point: it can be
    # over-optimised, and appeal() shows when it is.)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 1))


def aesthetic_score(judge, mlp, images):
    """The world's LAION-style aesthetic score of images in [0, 1]: [B]. Differentiable."""
    return mlp(F.normalize(judge_image_features(judge, images), dim=-1))[:, 0]


def tokenize(tokenizer, texts):
    return tokenizer(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                     return_tensors="pt").input_ids


def judge_image_features(judge, images):
    """Projected image embeddings, [B, 64], from images in [0, 1] at 32x32 (any size is resized)."""
    images = to_world_size(images)
    return judge.visual_projection(judge.vision_model(pixel_values=images * 2 - 1).pooler_output)


def judge_text_features(judge, input_ids):
    return judge.text_projection(judge.text_model(input_ids=input_ids).pooler_output)


def judge_logits(judge, images, text_features):
    """CLIP's scaled cosine similarity of each image with each text: [B, T]."""
    img = F.normalize(judge_image_features(judge, images), dim=-1)
    return judge.logit_scale.exp() * img @ F.normalize(text_features, dim=-1).T


def judge_read(judge, tokenizer, images):
    """What the judge sees: colour, shape and background indices [B] (each the argmax of the
    caption probabilities summed over the other two attributes)."""
    with torch.no_grad():
        text = judge_text_features(judge, tokenize(tokenizer, CAPTIONS))
        probs = judge_logits(judge, images, text).softmax(-1).view(-1, len(COLOURS), len(SHAPES), len(BACKGROUNDS))
    return dict(colour=probs.sum((2, 3)).argmax(1), shape=probs.sum((1, 3)).argmax(1),
                background=probs.sum((1, 2)).argmax(1))


def attribute_accuracy(read, labels):
    colour, rest = labels // (len(SHAPES) * len(BACKGROUNDS)), labels % (len(SHAPES) * len(BACKGROUNDS))
    truth = dict(colour=colour, shape=rest // len(BACKGROUNDS), background=rest % len(BACKGROUNDS))
    return {k: (read[k] == truth[k]).float().mean().item() for k in truth}


# ---------------------------------------------------------------------------------------------
# The world's reward models, as rewards.py loads them (`--reward=shapes_alignment` etc.) from a
# built world folder (shapes_build.ensure_world()): frozen weights.

def load_judge(folder, device="cpu"):
    """The world's judge. The shipped world stores its text tower once, as the pipeline's text encoder
    (shapes/build.py, ship_world): then the judge's own file has none, and it is put back from there."""
    from safetensors.torch import load_file
    from transformers import CLIPConfig, CLIPModel
    weights = load_file(os.path.join(folder, "judge", "model.safetensors"))
    if not any(k.startswith(TEXT_MODEL_PREFIX) for k in weights):
        weights.update(load_file(os.path.join(folder, "text_encoder", "model.safetensors")))
    with torch.random.fork_rng(devices=[]):  # its random initialisation leaves the caller's random stream alone
        judge = CLIPModel(CLIPConfig.from_pretrained(os.path.join(folder, "judge")))
    judge.load_state_dict(weights)  # strict: every weight from the files, none left as initialised
    return judge.to(device).eval().requires_grad_(False)


def load_aesthetic(folder, device="cpu"):
    from safetensors.torch import load_file
    mlp = new_aesthetic()
    mlp.load_state_dict(load_file(os.path.join(folder, "aesthetic", "model.safetensors")))
    return mlp.to(device).eval().requires_grad_(False)
