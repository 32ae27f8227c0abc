"""The shapes world itself: what its images show and how to read them, with no learning involved.

32x32 RGB images in [0, 1] of one shape (circle, square, triangle, cross) in one of six colours on a
light, grey or dark background, and their captions ("a red circle on a dark background"; 72 in
all). Two programmatic readings of any image: `check`, the pixel checker (which colour, shape and
background are drawn), and `appeal`, the world's ground-truth aesthetic score. The tiny models that
learn this world are in shapes/models.py; shapes/build.py trains them.

Hard prompts: six colour-shape pairs (RARE_PAIRS, one per colour, each shape at most twice) are
rare in the denoiser's pretraining data only, as "a dolphin riding a bike" is rare in Stable
Diffusion's: every colour and every shape stays common on its own, only the combination is rare.
"""
import itertools
import math
import re

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# The world: one shape, in one colour, on a plain background, 32x32 RGB in [0, 1].
SIZE = 32
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (0.90, 0.12, 0.12), "green": (0.15, 0.70, 0.20), "blue": (0.15, 0.30, 0.95),
           "yellow": (0.95, 0.85, 0.10), "purple": (0.55, 0.20, 0.75), "orange": (1.00, 0.55, 0.05)}
BACKGROUNDS = {"light": 0.90, "grey": 0.50, "dark": 0.10}
COLOUR_NAMES, BACKGROUND_NAMES = tuple(COLOURS), tuple(BACKGROUNDS)
PALETTE = torch.tensor(list(COLOURS.values()))
GREYS = torch.tensor(list(BACKGROUNDS.values()))
# How far each shape reaches from its centre, in units of its size r (keeps shapes inside the image).
EXTENT = torch.tensor([1.0, 0.9, 1.4, 1.0])
R_MIN, R_MAX = 6.0, 10.0  # shape size range, pixels


def caption(colour, shape, background, marked=False):
    """"a red circle on a dark background"; marked: "a (red) (circle) on a (dark) background",
    the parentheses marking the phrases DiffExp's random prompt weighting may up-weight."""
    article = "an" if colour[0] in "aeiou" else "a"
    if marked:
        return f"{article} ({colour}) ({shape}) on a ({background}) background"
    return f"{article} {colour} {shape} on a {background} background"


# Every caption of the world, in label order: index = (colour * 4 + shape) * 3 + background.
LABELS = list(itertools.product(range(len(COLOURS)), range(len(SHAPES)), range(len(BACKGROUNDS))))
CAPTIONS = [caption(COLOUR_NAMES[c], SHAPES[s], BACKGROUND_NAMES[b]) for c, s, b in LABELS]


def prompts(which="all"):
    """The world's prompts, phrases marked: all 72 ("shapes"), the 18 naming a rare colour-shape
    pair ("shapes_rare") or the other 54 ("shapes_common"), as prompt_sets.load_prompts gives them."""
    keep = {"all": lambda i: True, "rare": lambda i: bool(is_rare(i)), "common": lambda i: not is_rare(i)}[which]
    return [caption(COLOUR_NAMES[c], SHAPES[s], BACKGROUND_NAMES[b], marked=True)
            for i, (c, s, b) in enumerate(LABELS) if keep(i)]


def parse_prompt(prompt):
    """(colour, shape, background) indices named in a prompt, each None when absent."""
    words = re.findall(r"[a-z]+", prompt.lower().replace("gray", "grey"))
    find = lambda names: next((names.index(w) for w in words if w in names), None)
    return find(COLOUR_NAMES), find(SHAPES), find(BACKGROUND_NAMES)


# The rare colour-shape pairs: one per colour; circle and triangle twice, square and cross once.
RARE_PAIRS = (("red", "triangle"), ("green", "cross"), ("blue", "circle"),
              ("yellow", "square"), ("purple", "triangle"), ("orange", "circle"))
RARE_PAIR_INDICES = tuple(COLOUR_NAMES.index(c) * len(SHAPES) + SHAPES.index(s) for c, s in RARE_PAIRS)


def is_rare(labels):
    """Whether caption labels (indices into CAPTIONS) name a rare colour-shape pair: bool [n]."""
    return torch.isin(torch.as_tensor(labels) // len(BACKGROUNDS), torch.tensor(RARE_PAIR_INDICES))


RARE_CAPTIONS = [c for i, c in enumerate(CAPTIONS) if is_rare(torch.tensor([i]))[0]]


def pair_weights(rare_weight):
    """Sampling weight of each colour-shape pair (index colour * 4 + shape): 1 for a common pair,
    `rare_weight` for a rare one. A rare pair is then drawn with probability
    rare_weight / (18 + 6 rare_weight), all six with rare_weight / (3 + rare_weight)."""
    w = torch.ones(len(COLOURS) * len(SHAPES))
    w[list(RARE_PAIR_INDICES)] = rare_weight
    return w


def sample_scenes(n, generator, rare_weight=1.0, rare_wrong=0.0):
    """n random scenes: label indices, size r and centre (pixels), drawn from `generator`. With
    rare_weight < 1 the colour-shape pair comes from pair_weights(rare_weight), and a fraction
    `rare_wrong` of the rare pairs' images show the next shape instead while their caption still
    names the rare one (the denoiser's data: "caption_shape" is what the caption says); the
    defaults are the uniform, correctly captioned world every other model learns from."""
    g = generator
    if rare_weight == 1.0 and rare_wrong == 0.0:
        shape = torch.randint(len(SHAPES), (n,), generator=g)
        colour = torch.randint(len(COLOURS), (n,), generator=g)
        caption_shape = shape
    else:
        pair = torch.multinomial(pair_weights(rare_weight), n, replacement=True, generator=g)
        colour, caption_shape = pair // len(SHAPES), pair % len(SHAPES)
        wrong = torch.isin(pair, torch.tensor(RARE_PAIR_INDICES)) & (torch.rand(n, generator=g) < rare_wrong)
        shape = torch.where(wrong, (caption_shape + 1) % len(SHAPES), caption_shape)
    background = torch.randint(len(BACKGROUNDS), (n,), generator=g)
    r = R_MIN + (R_MAX - R_MIN) * torch.rand(n, generator=g)
    margin = r * EXTENT[shape] + 1.0
    centre = margin[:, None] + (SIZE - 2 * margin[:, None]) * torch.rand(n, 2, generator=g)
    return dict(shape=shape, colour=colour, background=background, r=r, centre=centre, caption_shape=caption_shape)


def shape_field(shape, dx, dy):
    """Shape `shape` (an index into SHAPES) of size r, centred at the origin, covers exactly the
    points whose field is below r. dx, dy: offsets from the centre in pixels (y grows downwards)."""
    dx = dx.abs()
    if shape == 0:  # circle of radius r
        return torch.sqrt(dx ** 2 + dy ** 2)
    if shape == 1:  # square of half side 0.9 r
        return torch.maximum(dx, dy.abs()) / 0.9
    if shape == 2:  # equilateral triangle pointing up, circumradius 1.4 r (inradius 0.7 r): inside
        s, c = math.sin(math.pi / 3), math.cos(math.pi / 3)  # the half-planes of its three edges
        return torch.maximum(dy, s * dx - c * dy) / 0.7
    # cross: two 2r x 0.8r bars
    return torch.minimum(torch.maximum(dx, dy.abs() / 0.4), torch.maximum(dx / 0.4, dy.abs()))


SUPERSAMPLE = 4  # anti-aliasing: a pixel's coverage is measured at 4 x 4 points inside it


def render(scenes):
    """Images [n, 3, 32, 32] in [0, 1], anti-aliased."""
    shape, r, centre = scenes["shape"], scenes["r"], scenes["centre"]
    points = (torch.arange(SIZE * SUPERSAMPLE, dtype=torch.float32) + 0.5) / SUPERSAMPLE
    cover = torch.zeros(len(shape), 1, SIZE, SIZE)
    for k in range(len(SHAPES)):
        i = torch.nonzero(shape == k)[:, 0]
        dx = points[None, None, :] - centre[i, 0, None, None]
        dy = points[None, :, None] - centre[i, 1, None, None]
        inside = (shape_field(k, dx, dy) < r[i, None, None]).float()
        cover[i] = F.avg_pool2d(inside[:, None], SUPERSAMPLE)
    fg = PALETTE[scenes["colour"]][:, :, None, None]
    bg = GREYS[scenes["background"]][:, None, None, None]
    return bg * (1 - cover) + fg * cover


def make_batch(n, generator, rare_weight=1.0, rare_wrong=0.0):
    """(images [n,3,32,32], captions, labels [n] indexing CAPTIONS): fresh data, deterministic per
    generator (see sample_scenes for rare_weight and rare_wrong: the captions say caption_shape)."""
    scenes = sample_scenes(n, generator, rare_weight, rare_wrong)
    labels = (scenes["colour"] * len(SHAPES) + scenes["caption_shape"]) * len(BACKGROUNDS) + scenes["background"]
    return render(scenes), [CAPTIONS[i] for i in labels.tolist()], labels


# ---------------------------------------------------------------------------------------------
# Programmatic readings of an image: the pixel checker (what is drawn) and the appeal score.

def to_world_size(images):
    """Images of any size as 32x32: a box filter (exact for whole-number factors, e.g. 512 -> 32),
    made of tensor ops so gradients flow through it."""
    if images.shape[-2:] == (SIZE, SIZE):
        return images
    return F.interpolate(images, size=(SIZE, SIZE), mode="area")


def _foreground(images):
    """Background colour (median of the border pixels), per-pixel distance from it in [0, 1]."""
    border = torch.cat([images[:, :, 0], images[:, :, -1], images[:, :, 1:-1, 0], images[:, :, 1:-1, -1]], 2)
    bg = border.median(2).values  # [B, 3]
    dist = (images - bg[:, :, None, None]).norm(dim=1) / math.sqrt(3)  # [B, H, W]
    return bg, dist


def appeal(images):
    """The world's programmatic aesthetic ("appeal") score in [0, 10], differentiable.

    The mean of three terms in [0, 1], from a soft foreground mask (pixels away from the border's
    colour):
      size:     the shape's area as a fraction of the image, best at 1/4; it falls back to 0 at 1/2,
                so a model that only learns "bigger is better" is caught over-optimising;
      centre:   1 at the image centre, 0 at 8 pixels or more from it;
      contrast: the foreground's mean colour distance from the background, full at 0.6.
    """
    _, dist = _foreground(to_world_size(images.float()))
    mask = torch.sigmoid((dist - 0.1) / 0.01)
    area = mask.mean((1, 2))
    size = torch.where(area <= 0.25, area / 0.25, (1 - (area - 0.25) / 0.25).clamp(min=0))
    weight = mask / (mask.sum((1, 2), keepdim=True) + 1e-6)
    xy = torch.arange(SIZE, dtype=dist.dtype, device=dist.device) + 0.5
    cx, cy = (weight.sum(1) * xy).sum(1), (weight.sum(2) * xy).sum(1)
    centre = 1 - (torch.sqrt((cx - SIZE / 2) ** 2 + (cy - SIZE / 2) ** 2 + 1e-8) / 8).clamp(max=1)
    contrast = ((weight * dist).sum((1, 2)) / 0.6).clamp(max=1)
    return 10 * (size + centre + contrast) / 3


def check(images):
    """The pixel checker: read colour, shape and background off the pixels, no learning involved.

    Background: nearest grey to the border's median colour. Foreground: pixels more than half the
    shape's contrast away from it (the 0.5-coverage contour the renderer draws). Colour: nearest
    palette entry to the mean of the foreground's core. Shape: best intersection-over-union against
    each shape drawn at the foreground's centroid over a range of sizes. Returns label indices [B]
    plus the centroid [B, 2] and area fraction [B] (for diversity figures).
    """
    images = to_world_size(images.detach().float().cpu())
    bg, dist = _foreground(images)
    B = images.shape[0]
    contrast = dist.flatten(1).quantile(0.98, dim=1)
    core = dist >= 0.8 * contrast[:, None, None]
    fg_colour = (images * core[:, None]).sum((2, 3)) / core.sum((1, 2))[:, None].clamp(min=1)
    colour = torch.cdist(fg_colour, PALETTE).argmin(1)
    background = (bg.mean(1)[:, None] - GREYS[None]).abs().argmin(1)
    mask = (dist > 0.5 * contrast[:, None, None]).float()
    xy = torch.arange(SIZE, dtype=torch.float32) + 0.5
    area = mask.sum((1, 2))
    centroid = torch.stack([(mask.sum(1) * xy).sum(1), (mask.sum(2) * xy).sum(1)], 1) / area[:, None].clamp(min=1)
    # every (shape, size) template at each image's centroid (all four shapes are centred on it)
    radii = torch.linspace(3, 13, 41)
    pixels = torch.arange(SIZE, dtype=torch.float32) + 0.5
    dx, dy = pixels[None, None, :] - centroid[:, 0, None, None], pixels[None, :, None] - centroid[:, 1, None, None]
    fields = torch.stack([shape_field(k, dx, dy) for k in range(len(SHAPES))], 1)  # [B, 4, 32, 32]
    templates = (fields[:, :, None] < radii[None, None, :, None, None]).float()
    inter = (templates * mask[:, None, None]).sum((3, 4))
    union = templates.sum((3, 4)) + area[:, None, None] - inter
    iou = (inter / union.clamp(min=1)).amax(2)  # best size per shape: [B, S]
    return dict(colour=colour, shape=iou.argmax(1), background=background, centroid=centroid,
                area=area / SIZE ** 2, iou=iou.amax(1))
