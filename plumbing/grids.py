"""Image grids and the diversity figure: the pictures every script writes, and one number for how
different the samples of one prompt are.
"""
import math
import os
import textwrap

import torch

from plumbing import runs
def diversity(images):
    """Mean pairwise RMS pixel distance between the samples of one prompt, averaged over prompts.
    images: [P, S, 3, H, W] in [0, 1]. 0 = all seeds gave the same image."""
    flat = images.flatten(2)
    return torch.stack([torch.pdist(f).mean() for f in flat]).mean().item() / math.sqrt(flat.shape[-1])


def save_grid(images, row_captions, path, titles=None, seeds=None):
    """A PNG grid: one row per caption (written at the left), the images of that row left to right.
    `images`: [rows * cols, 3, H, W] or [rows, cols, 3, H, W] in [0, 1], or a list of such blocks
    drawn side by side under their `titles` (plain vs explore). `seeds` labels the columns."""
    from PIL import Image, ImageDraw, ImageFont
    blocks = [b.detach().float().cpu().reshape(len(row_captions), -1, *b.shape[-3:])
              for b in (images if isinstance(images, (list, tuple)) else [images])]
    titles = titles or [""] * len(blocks)
    P, S, _, H, W = blocks[0].shape
    k = max(1, round(128 / H))  # upscale tiny images (nearest) so they stay legible next to the text
    ch, cw, cap_w, head_h, gap = H * k + 2, W * k + 2, 230, 56, 24  # tiles keep a 2 px white border
    canvas = Image.new("RGB", (cap_w + len(blocks) * (S * cw + gap), head_h + P * ch + 4), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=14)
    for b, (imgs, title) in enumerate(zip(blocks, titles)):
        x0 = cap_w + b * (S * cw + gap)
        draw.multiline_text((x0, 2), textwrap.fill(title, max(20, S * cw // 8)), fill="black", font=font, spacing=1)
        for s in range(S):
            if seeds is not None:
                draw.text((x0 + s * cw + 4, 36), f"seed {seeds[s]}", fill="gray", font=font)
            for p in range(P):
                tile = (imgs[p, s].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
                canvas.paste(Image.fromarray(tile).resize((W * k, H * k), Image.NEAREST), (x0 + s * cw, head_h + p * ch))
    for p, text in enumerate(row_captions):
        draw.multiline_text((6, head_h + p * ch + 6), textwrap.fill(text, 26), fill="black", font=font)
    os.makedirs(os.path.dirname(str(path)) or ".", exist_ok=True)
    fmt = Image.registered_extensions().get(os.path.splitext(str(path))[1].lower(), "PNG")
    runs.atomic_write(str(path), lambda tmp: canvas.save(tmp, format=fmt))  # never half a picture
