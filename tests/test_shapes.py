"""The shapes world: rendering checked against geometry, the pixel checker and appeal score against
hand computations, and a micro build (seconds) for the plumbing: cache, pipeline folder, rewards."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import explore
import prompt_sets
import rewards
from shapes import build as shapes_build
from shapes import models as shapes_models
from shapes import world as shapes_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def scene(shape, colour="red", background="dark", r=8.0, centre=(16.0, 16.0)):
    return dict(shape=torch.tensor([shapes_world.SHAPES.index(shape)]), colour=torch.tensor([shapes_world.COLOUR_NAMES.index(colour)]),
                background=torch.tensor([shapes_world.BACKGROUND_NAMES.index(background)]), r=torch.tensor([r]),
                centre=torch.tensor([centre]))


# ------------------------------------------------------------------------------------ the world

def test_batches_are_deterministic_per_seed_and_in_range():
    a, caps_a, la = shapes_world.make_batch(16, torch.Generator().manual_seed(3))
    b, caps_b, lb = shapes_world.make_batch(16, torch.Generator().manual_seed(3))
    c, _, _ = shapes_world.make_batch(16, torch.Generator().manual_seed(4))
    assert a.shape == (16, 3, 32, 32) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and caps_a == caps_b and torch.equal(la, lb)
    assert not torch.equal(a, c)
    assert caps_a == [shapes_world.CAPTIONS[i] for i in la.tolist()]


@pytest.mark.parametrize("shape,area", [
    ("circle", math.pi * 8 ** 2),
    ("square", (2 * 0.9 * 8) ** 2),
    ("triangle", 3 * math.sqrt(3) / 4 * (1.4 * 8) ** 2),  # equilateral, circumradius 1.4 r
    ("cross", 2 * (2 * 8) * (0.8 * 8) - (0.8 * 8) ** 2),  # two 2r x 0.8r bars, overlap counted once
])
def test_rendered_area_matches_geometry(shape, area):
    # coverage summed over pixels = the shape's area, to anti-aliasing error along the edge
    image = shapes_world.render(scene(shape, "yellow", "dark", r=8.0, centre=(16.3, 15.8)))
    fg, bg = torch.tensor(shapes_world.COLOURS["yellow"]), shapes_world.BACKGROUNDS["dark"]
    coverage = ((image[0, 0] - bg) / (fg[0] - bg)).sum().item()
    assert coverage == pytest.approx(area, rel=0.03)


def test_rendered_colours_and_placement():
    image = shapes_world.render(scene("square", "blue", "light", r=6.0, centre=(10.0, 20.0)))[0]
    assert torch.allclose(image[:, 20, 10], torch.tensor(shapes_world.COLOURS["blue"]))  # row = y, column = x
    assert torch.allclose(image[:, 0, 0], torch.full((3,), shapes_world.BACKGROUNDS["light"]))
    assert torch.allclose(image[:, 20, 20], torch.full((3,), shapes_world.BACKGROUNDS["light"]))  # right of it


def test_shapes_stay_inside_the_image():
    scenes = shapes_world.sample_scenes(2000, torch.Generator().manual_seed(0))
    images = shapes_world.render(scenes)
    border = torch.cat([images[:, :, 0], images[:, :, -1], images[:, :, :, 0], images[:, :, :, -1]], 2)
    background = shapes_world.GREYS[scenes["background"]][:, None, None]
    assert torch.allclose(border, background.expand_as(border))
    assert scenes["r"].min() >= shapes_world.R_MIN and scenes["r"].max() <= shapes_world.R_MAX


def test_rare_pairs_leave_every_colour_and_shape_common():
    colours = [c for c, _ in shapes_world.RARE_PAIRS]
    shapes_ = [s for _, s in shapes_world.RARE_PAIRS]
    assert sorted(colours) == sorted(shapes_world.COLOUR_NAMES)  # one rare pair per colour
    assert max(shapes_.count(s) for s in shapes_world.SHAPES) <= 2  # each shape rare with two colours at most
    rare = prompt_sets.load_prompts("shapes_rare")
    assert [rewards.strip_marks(p) for p in rare] == shapes_world.RARE_CAPTIONS and len(rare) == 18
    common = prompt_sets.load_prompts("shapes_common")
    assert len(common) == 54 and sorted(rare + common) == sorted(prompt_sets.load_prompts("shapes"))
    for p in rare:
        c, s, _ = shapes_world.parse_prompt(p)
        assert (shapes_world.COLOUR_NAMES[c], shapes_world.SHAPES[s]) in shapes_world.RARE_PAIRS


@pytest.mark.parametrize("rare_weight", [0.05, 0.2])
def test_the_denoisers_sampler_draws_rare_pairs_at_the_configured_rate(rare_weight):
    n = 200_000
    scenes = shapes_world.sample_scenes(n, torch.Generator().manual_seed(0), rare_weight)
    pair = scenes["colour"] * len(shapes_world.SHAPES) + scenes["shape"]
    rare = torch.isin(pair, torch.tensor(shapes_world.RARE_PAIR_INDICES))
    expected = 6 * rare_weight / (18 + 6 * rare_weight)  # a rare pair weighs rare_weight, a common one 1
    assert rare.float().mean().item() == pytest.approx(expected, abs=4 * (expected / n) ** 0.5)
    counts = torch.bincount(pair, minlength=24).float() / n
    common = [i for i in range(24) if i not in shapes_world.RARE_PAIR_INDICES]
    assert counts[common].min() > 0.9 / (18 + 6 * rare_weight) and counts[common].max() < 1.1 / (18 + 6 * rare_weight)
    # backgrounds stay uniform, and the other models' data (rare_weight 1) stays what it was
    assert torch.bincount(scenes["background"], minlength=3).min() > 0.32 * n
    uniform = shapes_world.sample_scenes(1000, torch.Generator().manual_seed(0))
    again = shapes_world.sample_scenes(1000, torch.Generator().manual_seed(0), 1.0)
    assert all(torch.equal(uniform[k], again[k]) for k in uniform)


def test_captions_and_prompts():
    assert shapes_world.caption("orange", "cross", "grey") == "an orange cross on a grey background"
    assert shapes_world.caption("red", "circle", "dark", marked=True) == "a (red) (circle) on a (dark) background"
    prompts = shapes_world.prompts()
    assert len(set(prompts)) == 72 == len(shapes_world.CAPTIONS)
    import rewards
    assert [rewards.strip_marks(p) for p in prompts] == shapes_world.CAPTIONS
    for i, (c, s, b) in enumerate(shapes_world.LABELS):
        assert shapes_world.parse_prompt(prompts[i]) == (c, s, b)
    assert shapes_world.parse_prompt("a gray square") == (None, 1, shapes_world.BACKGROUND_NAMES.index("grey"))
    assert prompt_sets.load_prompts("shapes") == prompts


def test_pixel_checker_reads_real_images():
    images, _, labels = shapes_world.make_batch(300, torch.Generator().manual_seed(1))
    read = shapes_world.check(images)
    assert shapes_models.attribute_accuracy(read, labels) == {"colour": 1.0, "shape": 1.0, "background": 1.0}
    # and at another resolution (what a user's 512x512 images would be resized from)
    big = torch.nn.functional.interpolate(images[:20], size=96, mode="nearest")
    assert shapes_models.attribute_accuracy(shapes_world.check(big), labels[:20]) == {"colour": 1.0, "shape": 1.0, "background": 1.0}


def test_pixel_checker_centroid_and_area():
    read = shapes_world.check(shapes_world.render(scene("circle", r=7.0, centre=(11.0, 19.0))))
    assert read["centroid"][0].tolist() == pytest.approx([11.0, 19.0], abs=0.1)
    assert read["area"][0].item() == pytest.approx(math.pi * 49 / 1024, rel=0.05)


# ------------------------------------------------------------------------------------ appeal

def hand_appeal(area, dist_from_centre, contrast):
    size = area / 0.25 if area <= 0.25 else max(0.0, 1 - (area - 0.25) / 0.25)
    return 10 * (size + (1 - min(dist_from_centre / 8, 1)) + min(contrast / 0.6, 1)) / 3


def test_appeal_against_hand_computation():
    # a 16x16 square (area exactly 1/4) centred, white on black: contrast 1
    image = torch.zeros(1, 3, 32, 32)
    image[:, :, 8:24, 8:24] = 1.0
    assert shapes_world.appeal(image).item() == pytest.approx(hand_appeal(0.25, 0, 1.0), abs=0.05)
    # an 8x8 grey square, off centre by (8, 4) pixels: contrast 0.4 in every channel
    image = torch.full((1, 3, 32, 32), 0.1)
    image[:, :, 16:24, 20:28] = 0.5
    assert shapes_world.appeal(image).item() == pytest.approx(hand_appeal(64 / 1024, math.hypot(8, 4), 0.4), abs=0.05)
    # a shape filling half the image scores nothing for size
    image = torch.zeros(1, 3, 32, 32)
    image[:, :, 1:31, 8:24] = 1.0  # 30 x 16 = 480 pixels, border still mostly black
    assert shapes_world.appeal(image).item() == pytest.approx(hand_appeal(480 / 1024, 0, 1.0), abs=0.1)


def test_appeal_is_differentiable_and_ranks_sensibly():
    big = shapes_world.render(scene("square", "red", "light", r=9.0))
    small = shapes_world.render(scene("square", "yellow", "light", r=5.0, centre=(7.0, 7.0)))
    images = torch.cat([big, small]).requires_grad_(True)
    score = shapes_world.appeal(images)
    assert score[0] > score[1]
    score.sum().backward()
    assert images.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------ the micro build

@pytest.fixture(scope="session")
def world(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("shapes_cache"))
    return shapes_build.ensure_world(micro=True, cache=cache), cache


def test_build_config_refuses_unknown_keys():
    with pytest.raises(ValueError, match="unet_steps"):
        shapes_build.build_config(unet_step=3)
    assert shapes_build.build_config(micro=True)["unet_steps"] == shapes_build.MICRO["unet_steps"]
    assert shapes_build.build_config(micro=True, unet_steps=5)["unet_steps"] == 5


def test_world_is_a_plain_diffusers_pipeline_folder(world):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    folder, _ = world
    pipe = StableDiffusionPipeline.from_pretrained(folder)  # diffusers alone, no project code
    pipe.set_progress_bar_config(disable=True)
    with open(os.path.join(folder, shapes_build.MANIFEST)) as f:
        manifest = json.load(f)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert len(pipe.tokenizer) == 49408 and pipe.tokenizer.model_max_length == shapes_models.MAX_TOKENS
    # the tokenizer gives the same ids as the real CLIP tokenizer (open_clip's own implementation;
    # it pads with 0 where SD's pads with the end token, so compare up to the end token)
    import open_clip
    for text in ["a red circle on a dark background", "an (orange) cross!", "Héllo wörld, ünïcode ✓ 日本"]:
        ids = pipe.tokenizer(text).input_ids
        assert ids == open_clip.tokenize([text])[0][:len(ids)].tolist()
    assert pipe.vae.config.scaling_factor == pytest.approx(manifest["scaling_factor"])
    assert pipe.unet.config.sample_size == 16  # a 16x16x4 latent
    images = pipe("a red circle on a dark background", num_inference_steps=2, guidance_scale=3.0,
                  output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 32, 32)
    assert set(manifest["seconds"]) >= {"vae", "judge", "aesthetic", "unet", "total"}
    # the hard prompts are recorded with the world: the clean captions of the rare pairs
    assert manifest["rare_captions"] == shapes_world.RARE_CAPTIONS and manifest["config"]["rare_weight"] < 1
    # the text encoder is the judge's text tower, frozen (as SD 1.5 uses CLIP's)
    judge = shapes_models.load_judge(folder)
    for name, p in pipe.text_encoder.state_dict().items():
        assert torch.equal(p, judge.text_model.state_dict()[name]), name


def test_cache_is_reused_and_a_corrupt_build_is_rebuilt_identically(world):
    folder, cache = world
    with open(os.path.join(folder, shapes_build.MANIFEST)) as f:
        hashes = json.load(f)["files"]
    assert shapes_build.ensure_world(micro=True, cache=cache) == folder  # reused
    weights = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(100)  # a half-written file
    assert not shapes_build.is_complete(folder)
    assert shapes_build.ensure_world(micro=True, cache=cache) == folder
    with open(os.path.join(folder, shapes_build.MANIFEST)) as f:
        assert json.load(f)["files"] == hashes  # deterministic: the same bytes again
    import shutil
    copy = folder + "-copy"
    shutil.copytree(folder, copy)
    assert shapes_build.is_complete(copy)
    with open(os.path.join(copy, "stray.txt"), "w") as f:  # a file the manifest does not know
        f.write("x")
    assert not shapes_build.is_complete(copy)
    os.remove(os.path.join(copy, shapes_build.MANIFEST))  # interrupted before the manifest was written
    assert not shapes_build.is_complete(copy)


def test_other_configurations_get_other_folders(world):
    folder, cache = world
    other = shapes_build.world_dir(shapes_build.build_config(micro=True, cache=cache, seed=1))
    assert other != folder and not shapes_build.is_complete(other)


def test_judge_similarity_matches_clipmodel_forward(world):
    # the world's PickScore: our feature path against transformers' own CLIPModel forward
    folder, _ = world
    judge = shapes_models.load_judge(folder)
    images, captions, _ = shapes_world.make_batch(4, torch.Generator().manual_seed(0))
    ids = shapes_models.tokenize(shapes_models.clip_tokenizer(shapes_models.MAX_TOKENS), captions)
    with torch.no_grad():
        ours = shapes_models.judge_logits(judge, images, shapes_models.judge_text_features(judge, ids))
        out = judge(input_ids=ids, pixel_values=images * 2 - 1)
    assert torch.allclose(ours, out.logits_per_image, atol=1e-4)
    # any resolution: a nearest-neighbour x2 upscale is resized back to the same pixels
    big = torch.nn.functional.interpolate(images, scale_factor=2, mode="nearest")
    assert torch.allclose(shapes_models.judge_image_features(judge, big), shapes_models.judge_image_features(judge, images), atol=1e-4)


def test_aesthetic_score_is_differentiable_and_frozen(world):
    folder, _ = world
    judge, mlp = shapes_models.load_judge(folder), shapes_models.load_aesthetic(folder)
    assert not any(p.requires_grad for p in list(judge.parameters()) + list(mlp.parameters()))
    images = shapes_world.make_batch(3, torch.Generator().manual_seed(0))[0].requires_grad_(True)
    score = shapes_models.aesthetic_score(judge, mlp, images)
    assert score.shape == (3,)
    score.sum().backward()
    assert images.grad.abs().sum() > 0


@pytest.mark.slow
def test_cli_prints_the_folder_last(world):
    folder, cache = world
    out = subprocess.run([sys.executable, "-m", "shapes.build", "--micro", f"--cache={cache}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == folder


# ------------------------------------------------- the saved folder reads in transformers 4.x as in 5

TEXTS = ["a red circle on a dark background", "an (orange) cross!", "Héllo wörld, ünïcode ✓ 日本",
         "A stack of 3 cubes. A red cube is on the top, sitting on a red cube."]


def test_saved_pipeline_has_the_files_transformers4_reads_and_reloads_identically(tmp_path):
    from safetensors import safe_open
    from transformers import CLIPTextModel, CLIPTokenizer
    from conftest import tiny_pipeline
    pipe = tiny_pipeline()
    shapes_models.save_pipeline(pipe, str(tmp_path))
    # the weights under the names 4.x's CLIPTextModel (a text_model wrapper) looks for
    with safe_open(str(tmp_path / "text_encoder" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert len(keys) == len(pipe.text_encoder.state_dict()) and all(k.startswith("text_model.") for k in keys)
    assert shapes_models.unreadable_by_transformers4(str(tmp_path)) == []
    # transformers 5 reads them back as the same model
    reloaded = CLIPTextModel.from_pretrained(str(tmp_path / "text_encoder"))
    ids = pipe.tokenizer(TEXTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(reloaded(ids)[0], pipe.text_encoder(ids)[0])
    # a tokenizer built from vocab.json and merges.txt alone (what 4.x's slow CLIPTokenizer reads;
    # its first merges line is a header it skips) tokenises as the saved tokenizer.json does
    vocab_only = tmp_path / "vocab_only"
    vocab_only.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (vocab_only / name).write_bytes((tmp_path / "tokenizer" / name).read_bytes())
    assert (vocab_only / "merges.txt").read_text(encoding="utf-8").splitlines()[0].startswith("#version")
    slow, fast = CLIPTokenizer.from_pretrained(str(vocab_only)), CLIPTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    assert len(slow) == len(fast) == 49408
    for text in TEXTS:
        assert slow(text).input_ids == fast(text).input_ids == pipe.tokenizer(text).input_ids


def old_format_world(cache, monkeypatch):
    """A micro world saved as the builds before save format 2 saved it (transformers 5's plain
    save_pretrained)."""
    with monkeypatch.context() as m:
        m.setattr(shapes_build, "save_pipeline", lambda pipe, folder: pipe.save_pretrained(folder))
        m.setattr(shapes_build, "SAVE_FORMAT", 1)
        folder = shapes_build.ensure_world(micro=True, cache=cache)
    with open(os.path.join(folder, shapes_build.MANIFEST)) as f:
        manifest = json.load(f)
    manifest.pop("save_format")  # the old manifests had no such key
    with open(os.path.join(folder, shapes_build.MANIFEST), "w") as f:
        json.dump(manifest, f)
    return folder, manifest["files"]


def test_a_world_saved_before_is_re_saved_in_place_not_rebuilt(tmp_path, monkeypatch):
    from transformers import CLIPTextModel
    folder, old = old_format_world(str(tmp_path), monkeypatch)
    assert sorted(shapes_models.unreadable_by_transformers4(folder)) == [
        "text_encoder/model.safetensors", "tokenizer/merges.txt", "tokenizer/vocab.json"]
    assert not shapes_build.is_complete(folder)
    ids = shapes_models.tokenize(shapes_models.clip_tokenizer(shapes_models.MAX_TOKENS), TEXTS)
    with torch.no_grad():
        before = CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder"))(ids)[0]
    monkeypatch.setattr(shapes_build, "build", lambda *a: pytest.fail("the cached world was rebuilt"))
    assert shapes_build.ensure_world(micro=True, cache=str(tmp_path)) == folder
    assert shapes_build.is_complete(folder) and shapes_models.unreadable_by_transformers4(folder) == []
    with open(os.path.join(folder, shapes_build.MANIFEST)) as f:
        new = json.load(f)["files"]
    changed = {p for p in set(old) | set(new) if old.get(p) != new.get(p)}
    assert changed == {"text_encoder/model.safetensors", "tokenizer/merges.txt", "tokenizer/vocab.json"}
    with torch.no_grad():
        assert torch.equal(CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder"))(ids)[0], before)


def test_a_migration_cut_short_is_finished_and_a_damaged_old_world_rebuilt(tmp_path, monkeypatch):
    folder, old = old_format_world(str(tmp_path), monkeypatch)
    shapes_models.make_readable_by_transformers4(folder)  # killed before the manifest was rewritten
    assert not shapes_build.is_complete(folder)
    assert shapes_build.migrate(folder) and shapes_build.is_complete(folder)
    folder, old = old_format_world(str(tmp_path / "b"), monkeypatch)
    with open(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"), "r+b") as f:
        f.truncate(100)  # damage that a re-save must not paper over
    assert not shapes_build.migrate(folder)
    rebuilt = []
    monkeypatch.setattr(shapes_build, "build", lambda tmp, cfg: rebuilt.append(tmp) or os.makedirs(tmp))
    shapes_build.ensure_world(micro=True, cache=str(tmp_path / "b"))
    assert len(rebuilt) == 1


MARKED = ["a red (circle) on a (dark) background", "an (orange) cross!", "(Héllo) wörld, ünïcode ✓ 日本"]
PHRASE, WEIGHT = [1, 0, -1], [1.2, 1.1, 1.15]


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("TRANSFORMERS4"), reason="set TRANSFORMERS4 to a folder holding transformers "
                    "4.x (pip install --target <folder> transformers==4.56.2 tokenizers==0.22.1 huggingface_hub==0.35.3 --no-deps)")
def test_the_world_reads_and_weights_phrases_the_same_in_transformers4(world, tmp_path):
    """The saved text encoder and tokenizer give the same ids and embeddings under transformers 4.x
    (from the folder TRANSFORMERS4, first on the path) as under the installed 5.x, and so does DiffExp's
    prompt weighting: 4.x's slow CLIPTokenizer, the class the folder names, has no character offsets,
    and every tokenizer class finds the same phrase tokens on every prompt of the project's prompt sets."""
    from test_explore import all_project_prompts
    folder, _ = world
    prompts = all_project_prompts()
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    script = tmp_path / "read.py"
    script.write_text(
        "import json, sys, types, torch, transformers\n"
        "from transformers import CLIPTextModel, CLIPTokenizer, CLIPTokenizerFast\n"
        "import explore, sampling\n"
        "model, info = CLIPTextModel.from_pretrained(sys.argv[1] + '/text_encoder', output_loading_info=True)\n"
        "assert not any(info.values()), info\n"
        "tok = CLIPTokenizer.from_pretrained(sys.argv[1] + '/tokenizer')\n"
        f"ids = tok({TEXTS!r}, padding='max_length', max_length=16, truncation=True, return_tensors='pt').input_ids\n"
        "pipe = types.SimpleNamespace(tokenizer=tok, text_encoder=model)\n"
        f"weighted = sampling.encode_prompts(pipe, {MARKED!r}, (torch.tensor({PHRASE!r}), torch.tensor({WEIGHT!r})))\n"
        "masks = {}\n"
        "for cls in (CLIPTokenizer, CLIPTokenizerFast):\n"
        "    t = cls.from_pretrained(sys.argv[1] + '/tokenizer')\n"
        "    parsed = [explore.parse_spans(p) for p in json.load(open(sys.argv[3]))]\n"
        "    masks[type(t).__name__] = [explore.phrase_mask(t, [c], torch.tensor([k]), 77)[0]\n"
        "                               for c in parsed for k in range(-1, len(c[1]))]\n"
        "with torch.no_grad():\n"
        "    torch.save(dict(version=transformers.__version__, ids=ids, out=model(ids)[0], weighted=weighted,\n"
        "                    masks=masks), sys.argv[2])\n")
    results = []
    for path in (os.environ["TRANSFORMERS4"], ""):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [path, ROOT])), OMP_NUM_THREADS="1")
        done = subprocess.run([sys.executable, str(script), folder, str(tmp_path / f"{len(results)}.pt"),
                               str(tmp_path / "prompts.json")], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        results.append(torch.load(tmp_path / f"{len(results)}.pt"))
    old, new = results
    assert old["version"].startswith("4.") and new["version"].startswith("5.")
    assert torch.equal(old["ids"], new["ids"]) and torch.equal(old["out"], new["out"])
    assert torch.equal(old["weighted"], new["weighted"])
    assert sorted(old["masks"]) == ["CLIPTokenizer", "CLIPTokenizerFast"]  # 4.x's slow and fast classes
    # the tokens whose character offsets overlap the phrase (offsets from 5.x's tokenizer)
    from test_explore import overlap_mask
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    want = [overlap_mask(tok, clean, spans[k] if k >= 0 else (0, len(clean)), 77)
            for clean, spans in map(explore.parse_spans, prompts) for k in range(-1, len(spans))]
    for masks in list(old["masks"].values()) + list(new["masks"].values()):
        assert len(masks) == len(want) and all(torch.equal(m, w) for m, w in zip(masks, want))
