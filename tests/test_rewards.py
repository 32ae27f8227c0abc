"""rewards.py: the real aesthetic / PickScore / shapes code paths on tiny random-weight models built
through the same classes, checked against the libraries' own preprocessing and forward passes."""
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import rewards
from shapes import models as shapes_models
from shapes import world as shapes_world
from conftest import PUBLISHED_SHAPES, random_predictor_state

# Our tensor preprocessing vs the PIL-based references: they round to uint8 after resizing (half a
# grey level) and compute the filter in fixed point; we keep floats. Allowed: 2 grey levels.
# Measured: ~1.0/255 at 512->224, ~1.6/255 at 32->224 (upsampling).
PIXEL_TOL = 2 / 255


def uint8_image(h, w, seed=0):
    """A test picture: smooth blobs plus pixel noise, exactly representable in uint8 so the
    references (which take PIL images) see the same pixels as we do. Returns (float [1,3,h,w], PIL)."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(h, w), mode="bilinear")
    x = 0.7 * x + 0.3 * torch.rand(1, 3, h, w, generator=g)
    u8 = (x * 255).round().to(torch.uint8)
    return u8.float() / 255, Image.fromarray(u8[0].permute(1, 2, 0).numpy())


def pixel_diff(ours, ref, std=rewards.OPENAI_STD):
    """Largest difference between two normalised images, in [0,1] pixel units."""
    return ((ours - ref).abs() * torch.tensor(std).view(1, 3, 1, 1)).max().item()


# ---------------------------------------------------------------- preprocessing

@pytest.mark.parametrize("h,w", [(512, 512), (32, 32), (96, 160)])
def test_preprocess_matches_open_clip_transform(h, w):
    import open_clip
    x, pil = uint8_image(h, w)
    ref = open_clip.image_transform(224, is_train=False)(pil)[None]  # Resize+CenterCrop+Normalize
    ours = rewards.clip_preprocess(x, 224)
    assert ours.shape == ref.shape == (1, 3, 224, 224)
    assert pixel_diff(ours, ref) <= PIXEL_TOL
    # the tolerance is tight enough to catch a resize without PIL's antialiasing
    naive = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False).clamp(0, 1)
    if (h, w) == (512, 512):
        assert pixel_diff(rewards.clip_preprocess(naive, 224), ref) > PIXEL_TOL


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
@pytest.mark.parametrize("size", [512, 32])
def test_preprocess_matches_clip_processor(size, backend):
    from transformers import CLIPImageProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    x, pil = uint8_image(size, size, seed=1)
    # PickScore's processor settings (laion/CLIP-ViT-H-14-laion2B-s32B-b79K): the class defaults
    proc = (CLIPImageProcessor if backend == "torchvision" else CLIPImageProcessorPil)()
    ref = torch.as_tensor(np.asarray(proc(images=pil, return_tensors="pt")["pixel_values"]))
    ours = rewards.clip_preprocess(x, proc.size["shortest_edge"], proc.crop_size["height"],
                                   proc.image_mean, proc.image_std)
    assert ours.shape == ref.shape
    assert pixel_diff(ours, ref, proc.image_std) <= PIXEL_TOL


def test_strip_marks_matches_explore():
    explore = pytest.importorskip("explore")
    for p in ["a (dolphin) (riding a bike)", "plain prompt", "a ( cat )"]:
        assert rewards.strip_marks(p) == explore.parse_phrases(p)[0]


# ---------------------------------------------------------------- aesthetic

def test_aesthetic_mlp_is_the_published_architecture():
    sd = random_predictor_state()
    mlp = rewards.AestheticMLP()
    mlp.load_state_dict(sd)  # strict: same key names and shapes, nothing missing or extra
    mlp.eval()
    e = torch.randn(5, 768)
    ref = e  # no activations between the layers: a chain of affine maps
    for k in PUBLISHED_SHAPES:
        ref = ref @ sd[k + ".weight"].T + sd[k + ".bias"]
    torch.testing.assert_close(mlp(e), ref, rtol=1e-4, atol=1e-4)
    drops = [m.p for m in mlp.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops == [0.2, 0.2, 0.1]


def test_aesthetic_path_and_gradient(tiny_open_clip):
    import open_clip
    name, ckpt, mlp_path = tiny_open_clip
    fn = rewards.load("aesthetic", clip_model=name, clip_pretrained=ckpt, mlp_path=mlp_path)
    assert fn.name == "aesthetic" and fn.differentiable
    # reference: open_clip's own model and transform on PIL images, then the published MLP. At
    # the model's native 32 px no resize happens, so the two paths must agree to float precision.
    (xa, pa), (xb, pb) = uint8_image(32, 32, seed=2), uint8_image(32, 32, seed=5)
    model, _, transform = open_clip.create_model_and_transforms(name, pretrained=ckpt,
                                                                force_quick_gelu=True)
    mlp = rewards.AestheticMLP()
    mlp.load_state_dict(torch.load(mlp_path))
    with torch.no_grad():
        e = model.eval().encode_image(torch.stack([transform(pa), transform(pb)]))
        ref = mlp.eval()(e / e.norm(dim=-1, keepdim=True))[:, 0]
    r = fn(torch.cat([xa, xb]), ["a (cat)", "a dog"])
    assert r.shape == (2,)
    assert (ref[0] - ref[1]).abs() > 1e-4  # the images score differently, so the check means something
    torch.testing.assert_close(r, ref, rtol=1e-5, atol=1e-6)
    # gradient reaches the pixels through the resize (non-square, not 32 px)
    images = torch.rand(2, 3, 48, 80, requires_grad=True)
    fn(images, ["a", "b"]).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


# ---------------------------------------------------------------- PickScore

def test_pickscore_path_and_gradient(tiny_pickscore):
    model, proc, model_dir, proc_dir = tiny_pickscore
    fn = rewards.load("pickscore", model=model_dir, processor=proc_dir)
    assert fn.name == "pickscore" and fn.differentiable
    # reference: the processor on PIL images and clean prompts, then CLIPModel's own forward
    # (logits_per_image = logit_scale.exp() * cos); at the native 32 px nothing is resized
    (x0, p0), (x1, p1) = uint8_image(32, 32, seed=3), uint8_image(32, 32, seed=4)
    prompts = ["a (red circle) on a (dark background)", "a photo of a dog"]
    inputs = proc(text=[rewards.strip_marks(p) for p in prompts], images=[p0, p1],
                  padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**inputs).logits_per_image.diagonal()
    r = fn(torch.cat([x0, x1]), prompts)
    torch.testing.assert_close(r, ref, rtol=1e-5, atol=1e-5)
    # the marks are stripped: same score with and without them
    torch.testing.assert_close(fn(torch.cat([x0, x1]), ["a red circle on a dark background",
                                                         "a photo of a dog"]), r)
    # gradient reaches the pixels through the resize, at 512 px
    images = torch.rand(2, 3, 512, 512, requires_grad=True)
    fn(images, prompts).sum().backward()
    assert images.grad.abs().sum() > 0


def test_loaded_models_are_frozen(tiny_pickscore):
    model, proc, _, _ = tiny_pickscore
    fn = rewards.load("pickscore", model=model, processor=proc)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert fn(torch.rand(1, 3, 40, 24), ["x"]).shape == (1,)  # non-square input works


# ---------------------------------------------------------------- JPEG

def pil_jpeg_kb(image):
    """Reference: PIL directly, quality 95, size in kB (1000 bytes)."""
    a = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=95)
    return len(buf.getvalue()) / 1000


def test_jpeg_rewards():
    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    images = torch.cat([flat, noise])
    comp = rewards.load("jpeg_compressibility")
    incomp = rewards.load("jpeg_incompressibility")
    assert not comp.differentiable and not incomp.differentiable
    c, i = comp(images, ["a", "b"]), incomp(images, ["a", "b"])
    assert c[0] > c[1]  # the flat image is more compressible than noise
    torch.testing.assert_close(i, -c)
    torch.testing.assert_close(i, torch.tensor([pil_jpeg_kb(flat[0]), pil_jpeg_kb(noise[0])]))


# ---------------------------------------------------------------- errors

def test_unknown_reward_lists_known_names():
    with pytest.raises(ValueError) as e:
        rewards.load("aesthetics")
    for name in rewards.REWARDS:
        assert name in str(e.value)


def test_require_differentiable():
    for name in ["jpeg_compressibility", "jpeg_incompressibility"]:
        with pytest.raises(ValueError, match="DDPO"):
            rewards.require_differentiable(name)
    with pytest.raises(ValueError, match="DDPO"):
        rewards.require_differentiable(rewards.load("jpeg_incompressibility"))
    rewards.require_differentiable("aesthetic")  # no error


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """Offline (conftest sets HF_HUB_OFFLINE=1) with nothing cached, on any machine."""
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(rewards, "CACHE_DIR", str(tmp_path / "diffexp"))


@pytest.mark.parametrize("name,model,size", [("aesthetic", "ViT-L-14", "GB"),
                                             ("pickscore", "PickScore_v1", "GB")])
def test_offline_error_names_the_model(empty_hub_cache, name, model, size):
    with pytest.raises(rewards.RewardUnavailable) as e:
        rewards.load(name)
    msg = str(e.value)
    assert isinstance(e.value, RuntimeError) and "\n" not in msg
    assert model in msg and size in msg and "online" in msg


def test_offline_error_for_the_aesthetic_mlp(empty_hub_cache, tiny_open_clip):
    import open_clip
    clip = open_clip.create_model(tiny_open_clip[0])
    with pytest.raises(rewards.RewardUnavailable, match=r"sac\+logos\+ava1-l14-linearMSE.*MB.*mlp_path"):
        rewards.load("aesthetic", clip=clip)


# ---------------------------------------------------------------- the shapes world

@pytest.fixture(scope="module")
def world_folder(tmp_path_factory):
    from shapes import build as shapes_build
    return shapes_build.ensure_world(micro=True, cache=str(tmp_path_factory.mktemp("shapes")))


def judge_reference(judge, images, captions):
    """The judge's own CLIPModel forward on its input format (shapes/build.py: 32 px, [-1, 1])."""
    from shapes import build as shapes_build
    x = F.interpolate(images, size=(32, 32), mode="bilinear", antialias=True) * 2 - 1
    tok = shapes_models.clip_tokenizer(shapes_models.MAX_TOKENS)
    ids = tok([rewards.strip_marks(c) for c in captions], padding=True, return_tensors="pt")
    with torch.no_grad():
        return judge(pixel_values=x, **ids).logits_per_image.diagonal(), x


def test_shapes_rewards_from_a_built_world(world_folder):
    from shapes import build as shapes_build
    images, captions, _ = shapes_world.make_batch(4, torch.Generator().manual_seed(0))
    images = images.clone().requires_grad_(True)
    ref, _ = judge_reference(shapes_models.load_judge(world_folder), images.detach(), captions)
    align = rewards.load("shapes_alignment", path=world_folder)
    r = align(images, captions)
    assert align.differentiable and r.shape == (4,)
    torch.testing.assert_close(r.detach(), ref, atol=1e-4, rtol=1e-4)
    r.sum().backward()
    assert images.grad.abs().sum() > 0
    aes = rewards.load("shapes_aesthetic", path=world_folder)
    a = aes(images, captions)
    assert aes.differentiable and a.shape == (4,) and torch.isfinite(a).all()
    appeal = rewards.load("shapes_appeal")
    torch.testing.assert_close(appeal(images.detach(), captions), shapes_world.appeal(images.detach()))
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    appeal(x, ["a", "b"]).sum().backward()
    assert appeal.differentiable and x.grad.abs().sum() > 0


def test_shapes_correct_reads_real_images_right():
    """The rendered world's own images match their captions (the checker is right on real data),
    and the same images scored against shuffled captions mostly do not."""
    from shapes import build as shapes_build
    images, captions, _ = shapes_world.make_batch(32, torch.Generator().manual_seed(1))
    fn = rewards.load("shapes_correct")
    assert not fn.differentiable
    assert fn(images, captions).mean() > 0.9
    assert fn(images, captions[1:] + captions[:1]).mean() < 0.7


def test_shapes_correct_counts_the_named_attributes():
    """The fraction of the attributes a prompt names that the image shows: one wrong colour out of
    three attributes scores 2/3; a prompt naming only the shape scores on the shape alone."""
    from shapes import build as shapes_build
    images, _, labels = shapes_world.make_batch(2, torch.Generator().manual_seed(5))
    c, s, b = shapes_world.LABELS[labels[1].item()]
    wrong = shapes_world.caption(shapes_world.COLOUR_NAMES[(c + 1) % 6], shapes_world.SHAPES[s], shapes_world.BACKGROUND_NAMES[b])
    right = shapes_world.prompts()[labels[0].item()]
    fn = rewards.load("shapes_correct")
    assert fn(images, [right, wrong]).tolist() == pytest.approx([1.0, 2 / 3])
    assert rewards.load("shapes_success")(images, [right, wrong]).tolist() == [1.0, 0.0]  # all or nothing
    shape0 = shapes_world.LABELS[labels[0].item()][1]
    assert fn(images[:1], ["a circle"]).item() == float(shape0 == shapes_world.SHAPES.index("circle"))


def test_shapes_rewards_with_given_models(tiny_pickscore):
    """The shapes_alignment / shapes_aesthetic code paths with a tiny judge and head passed in."""
    model, _, _, _ = tiny_pickscore
    head = torch.nn.Sequential(torch.nn.Linear(16, 1), torch.nn.Flatten(0))  # [B, D] -> [B]
    (x0, _), (x1, _) = uint8_image(32, 32, seed=6), uint8_image(32, 32, seed=7)
    images = torch.cat([x0, x1])
    prompts = ["a (red) (circle)", "a blue square"]
    ref_align, pixels = judge_reference(model, images, ["a red circle", "a blue square"])
    with torch.no_grad():
        e = model.get_image_features(pixel_values=pixels).pooler_output  # transformers 5: projected
        ref_head = head(e / e.norm(dim=-1, keepdim=True))
    align = rewards.load("shapes_alignment", judge=model)
    aes = rewards.load("shapes_aesthetic", judge=model, head=head)
    assert align.differentiable and aes.differentiable
    torch.testing.assert_close(align(images, prompts), ref_align, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aes(images, prompts), ref_head, rtol=1e-5, atol=1e-6)
    x = images.clone().requires_grad_(True)
    (align(x, prompts).sum() + aes(x, prompts).sum()).backward()
    assert x.grad.abs().sum() > 0
