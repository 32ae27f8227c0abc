"""DiffExp exploration (Chae et al., AAAI 2025, Sec. 3): two ways to draw more diverse online
samples while reward fine-tuning, and the switch that turns them off for the last quarter.

(a) Dynamic CFG schedule. Classifier-free guidance pulls every sample of a prompt
    towards the same few modes. Early, noisy timesteps decide the layout of the image, so DiffExp
    uses an extremely low scale `w_low` there (t > t_thres) and the usual `w_high` after: the
    layout varies as without guidance, the details still follow the prompt.
(b) Random prompt weighting. Each sample up-weights one phrase of its prompt by
    w ~ U(1.0, 1.2) (the whole prompt if none is marked), compel-style, on the text embeddings:
    z_w = z_empty + w * (z - z_empty) on that phrase's tokens. Phrases are marked with parentheses,
    "a (dolphin) (riding a bike)"; the marks are stripped before anything is encoded or scored.

Pure functions, no model code (the phrase's token positions ask the tokenizer only for token
counts): sampling.py applies them.
"""
import torch


def cfg_schedule(timesteps, w_high, w_low=1.0, t_thres=800):
    """One guidance scale per timestep: `w_low` where t > t_thres (the noisy start), else `w_high`.

    The paper asks only for an "extremely low" scale. In eps = uncond + w (cond - uncond), w = 1 is
    the conditional model without guidance (the prompt still steers the layout, as in the model's
    training), and w = 0 is the unconditional model (the layout ignores the prompt entirely); both
    are supported, and experiments/compare.py --ablation runs w_low = 0 as an arm of its own."""
    t = torch.as_tensor(timesteps)
    return torch.where(t > t_thres, torch.tensor(float(w_low)), torch.tensor(float(w_high)))


def parse_spans(prompt):
    """Strip the parentheses of `prompt`; return (clean_prompt, [(start, end), ...]), the character
    span of each marked phrase in the clean prompt. Nested, unbalanced or empty marks are errors."""
    clean, spans, start = [], [], None
    for ch in prompt:
        if ch == "(":
            if start is not None:
                raise ValueError(f"nested parentheses in prompt {prompt!r}; mark phrases flat, "
                                 "e.g. 'a (dolphin) (riding a bike)'")
            start = len(clean)
        elif ch == ")":
            if start is None:
                raise ValueError(f"unbalanced ')' in prompt {prompt!r}; every ')' needs an earlier '('")
            text = "".join(clean[start:])
            if not text.strip():
                raise ValueError(f"empty phrase '()' in prompt {prompt!r}; remove it or put words inside")
            # spans exclude surrounding spaces, so "( cat )" marks exactly "cat"
            lead = len(text) - len(text.lstrip())
            spans.append((start + lead, start + lead + len(text.strip())))
            start = None
        else:
            clean.append(ch)
    if start is not None:
        raise ValueError(f"unbalanced '(' in prompt {prompt!r}; close every phrase with ')'")
    return "".join(clean), spans


def parse_phrases(prompt):
    """'a (dolphin) (riding a bike)' -> ('a dolphin riding a bike', ['dolphin', 'riding a bike'])."""
    clean, spans = parse_spans(prompt)
    return clean, [clean[a:b] for a, b in spans]


def draw_weights(prompts, generator=None, w_min=1.0, w_max=1.2):
    """Random prompt weighting (Sec. 3): per prompt, pick one marked phrase uniformly and a weight
    w ~ U(w_min, w_max), fresh on every call. Returns (phrase [B] long, w [B]); phrase -1 means
    "the whole prompt" (no phrase marked). Pass a seeded torch.Generator for reproducible runs."""
    counts = torch.tensor([len(parse_spans(p)[1]) for p in prompts])
    u = torch.rand(len(prompts), generator=generator)
    phrase = torch.where(counts > 0, (u * counts).long().clamp(max=(counts - 1).clamp(min=0)), -1)
    w = w_min + (w_max - w_min) * torch.rand(len(prompts), generator=generator)
    return phrase, w


def _pre_token_kind(ch):
    r"""Which run of CLIP's pre-tokenizer a character belongs to. The pre-tokenizer splits text into
    runs of letters, single digits and runs of other symbols, dropping spaces (the regex
    [\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+ of openai/CLIP's simple_tokenizer.py, which SD's tokenizers
    keep), and BPE merges characters only inside a run."""
    return "space" if ch.isspace() else "letter" if ch.isalpha() else "digit" if ch.isnumeric() else "symbol"


def _cuts_a_run(text, i):
    """True where a cut before text[i] splits one pre-token (a run of letters or of symbols)."""
    return 0 < i < len(text) and _pre_token_kind(text[i - 1]) == _pre_token_kind(text[i]) in ("letter", "symbol")


def phrase_mask(tokenizer, parsed, phrase, length):
    """[B, length] bool: the token positions of each prompt's chosen phrase (-1: the whole prompt).
    `parsed` holds parse_spans' (clean prompt, spans) per prompt, `length` is the padded length.

    The positions come from token counts alone: the phrase's tokens start after those of the text
    before it and end where those of the text up to its end do. Character offsets would say the same
    more directly, but transformers 4.x's slow CLIPTokenizer (the class SD 1.5's and SDXL's folders
    name) has no `return_offsets_mapping`; counts work with every tokenizer class. Counting a prefix
    on its own gives the tokens it has inside the whole prompt because BPE never merges across a
    pre-token boundary (above); a mark inside a word, "(red)dish", is widened to the whole word,
    whose BPE pieces depend on all of its letters."""
    mask = torch.zeros(len(parsed), length, dtype=torch.bool)

    def n_tokens(text):
        # not truncated: a long prompt's count runs past `length` (clipped below); verbose=False
        # keeps the tokenizer from warning that the count exceeds its model_max_length
        return len(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)

    for i, (clean, spans) in enumerate(parsed):
        a, b = spans[int(phrase[i])] if phrase[i] >= 0 else (0, len(clean))
        while _cuts_a_run(clean, a):
            a -= 1
        while _cuts_a_run(clean, b):
            b += 1
        # position 0 is CLIP's start token; a prompt truncated to `length` keeps its end token last
        mask[i, 1 + n_tokens(clean[:a]):min(1 + n_tokens(clean[:b]), length - 1)] = True
    return mask


def weight_embeddings(z, z_empty, token_mask, w):
    """compel-style up-weighting: z_empty + w * (z - z_empty) on the masked token positions, z
    elsewhere. z [B,L,D]; z_empty [1 or B,L,D] (the encoding of ""); token_mask [B,L] bool; w [B].
    Moving away from the empty prompt's embedding (rather than scaling z) keeps the positional
    and padding content that every prompt shares, and strengthens only what the phrase adds."""
    w = torch.as_tensor(w, dtype=z.dtype, device=z.device).reshape(-1, 1, 1)
    weighted = z_empty + w * (z - z_empty)
    return torch.where(token_mask.to(z.device).unsqueeze(-1), weighted, z)


def explore_active(epoch, num_epochs, explore_frac=0.75):
    """Explore only during the first `explore_frac` of fine-tuning (epochs counted from 0): the
    last quarter samples as evaluation does, so the model settles on what it found,
    and the samples it is trained on match the ones it is judged by."""
    return epoch < explore_frac * num_epochs
