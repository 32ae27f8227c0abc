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

Pure functions, no model code (the phrase's token positions ask the tokenizer only to tokenize
pieces of the prompt): sampling.py applies them.
"""
import math

import torch


# The CFG schedule's threshold on any model. DiffExp states t_thres on DDPM timesteps (t in 0..999 of
# SD 1.5's training chain; the paper tries 900, 800 and 700), where x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps
# with a_t = alpha_bar_t of SD 1.5's "scaled_linear" betas (SDXL trains on the same schedule, so t_thres
# means the same there). A flow model (SD 3.5: x_s = (1 - s) x_0 + s eps, s = sigma in (0, 1], its
# timesteps s * 1000 with s shifted towards 1) has no such t, and its timesteps are not DDPM's: its
# timestep 800 is s = 0.8, with SNR 0.0625, less noisy than DDPM's t = 800 (SNR 0.038). What the
# threshold means is a noise level (the first, noisy part of the chain decides the layout), so we map
# it on the noise level itself, the signal-to-noise ratio of the two corruptions:
#     DDPM step t:  SNR = a_t / (1 - a_t)        flow step s:  SNR = ((1 - s) / s)^2
# and the flow step gets w_low where it is noisier than DDPM's t_thres, s > s_thres with
#     (1 - s_thres) / s_thres = sqrt(a / (1 - a)),  i.e.  s_thres = sqrt(1 - a) / (sqrt(a) + sqrt(1 - a)),
# a = alpha_bar at t_thres. (Equivalently: x_t / (sqrt(a) + sqrt(1 - a)) is a flow sample at
# s_thres, the same image and noise mixed in the same proportion.) For t_thres = 900, 800, 700:
# s_thres = 0.893, 0.836, 0.769; at SD 3.5's 40 steps (shift 3) that is the first 11, 15, 19 steps,
# where SD 1.5's 50 DDIM steps give the first 5, 10, 15 (the shift spends more steps at high noise).

def sd_alphas_cumprod():
    """alpha_bar_t, t = 0..999, of SD 1.5's (and SDXL's) training noise schedule, the one DiffExp's
    t_thres is stated on: "scaled_linear" betas, sqrt(beta) evenly spaced from sqrt(0.00085) to
    sqrt(0.012) (their scheduler_config.json), in float64."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def flow_threshold(t_thres):
    """The flow noise level s_thres as noisy as DDPM timestep `t_thres` (same SNR, comment above): a flow
    step at sigma s is "t > t_thres" when s > s_thres. DDPM timesteps are integers, so t > t_thres is
    t > floor(t_thres); below 0 every step is noisier (0.0), from 1000 on none is (1.0)."""
    k = math.floor(t_thres)
    alpha_bar = sd_alphas_cumprod()
    if k < 0:
        return 0.0  # every step is noisier
    if k >= len(alpha_bar):
        return 1.0  # no step is
    a = alpha_bar[k]
    return float((1 - a).sqrt() / (a.sqrt() + (1 - a).sqrt()))


def cfg_schedule(schedule, w_high, w_low=1.0, t_thres=800):
    """One guidance scale per sampling step: `w_low` for the noisy start (t > t_thres), else `w_high`.

    `schedule` is the scheduler after set_timesteps(num_steps), or DDPM timesteps (0..999, SD 1.5's and
    SDXL's DDIM scheduler.timesteps). t_thres is in DDPM timesteps whatever the model: a DDIM
    scheduler compares its own timesteps with it; a flow-matching one (SD 3.5) compares each step's
    sigma with flow_threshold(t_thres), the same noise level (comment above). A flow model's
    timesteps alone (sigma * 1000) would be compared as DDPM's, wrongly, so they are refused: pass its scheduler.

    The paper asks only for an "extremely low" scale. In eps = uncond + w (cond - uncond), w = 1 is
    the conditional model without guidance (the prompt still steers the layout, as in the model's
    training), and w = 0 is the unconditional model (the layout ignores the prompt entirely); both
    are supported, and experiments/compare.py --ablation runs w_low = 0 as an arm of its own."""
    if hasattr(schedule, "set_timesteps"):  # a scheduler
        if not hasattr(schedule, "alphas_cumprod"):  # flow matching: sigmas, no DDPM chain
            sigmas = schedule.sigmas[:len(schedule.timesteps)]  # step i's noise level (sigmas ends in 0)
            return _scales(sigmas > flow_threshold(t_thres), w_high, w_low)
        schedule = schedule.timesteps
    t = torch.as_tensor(schedule)
    if t.is_floating_point() and (t != t.round()).any():
        raise ValueError("cfg_schedule got timesteps that are not DDPM's integers (a flow model's, sigma * 1000?); "
                         "pass the scheduler itself: t_thres is in DDPM timesteps and maps to a flow model's sigma")
    return _scales(t > t_thres, w_high, w_low)


def _scales(noisy, w_high, w_low):
    return torch.where(noisy, torch.tensor(float(w_low)), torch.tensor(float(w_high)))


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


def _pre_token_kind(ch, at_spaces=False):
    r"""Which run of the tokenizer's pre-tokenizer a character belongs to; BPE (CLIP) and the unigram
    model (T5) merge characters only inside a run. CLIP's pre-tokenizer splits text into runs of
    letters, single digits and runs of other symbols, dropping spaces (the regex
    [\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+ of openai/CLIP's simple_tokenizer.py, which SD's tokenizers
    keep). SentencePiece's (T5's, `at_spaces`) splits at whitespace only: a word with its digits and
    punctuation, "cat," or "1960s", is one run."""
    if ch.isspace():
        return "space"
    if at_spaces:
        return "word"
    return "letter" if ch.isalpha() else "digit" if ch.isnumeric() else "symbol"


def _cuts_a_run(text, i, at_spaces=False):
    """True where a cut before text[i] splits one pre-token (a run of letters, of symbols, or a word)."""
    if not 0 < i < len(text):
        return False
    kind = _pre_token_kind(text[i - 1], at_spaces)
    return kind == _pre_token_kind(text[i], at_spaces) in ("letter", "symbol", "word")


def _splits_at_spaces(tokenizer):
    """True for a SentencePiece tokenizer (T5's, SD 3.5's third encoder): its pieces mark a word's start
    with "\u2581", "a" is "\u2581a" (CLIP's BPE marks a word's end instead, "a</w>")."""
    ids = tokenizer("a", add_special_tokens=False).input_ids
    return tokenizer.convert_ids_to_tokens(ids)[0].startswith("\u2581")


def phrase_mask(tokenizer, parsed, phrase, length):
    """[B, length] bool: the token positions of each prompt's chosen phrase (-1: the whole prompt).
    `parsed` holds parse_spans' (clean prompt, spans) per prompt, `length` is the padded length.
    Any of SD's tokenizers: CLIP's (a start token, then the prompt's, then an end token) and T5's
    (SD 3.5's third: no start token, the prompt's tokens, then </s>).

    The positions come from token counts alone: the phrase's tokens start after those of the text
    before it and end where those of the text up to its end do. Character offsets would say the same
    more directly, but transformers 4.x's slow CLIPTokenizer (the class SD 1.5's and SDXL's folders
    name) has no `return_offsets_mapping`; counts work with every tokenizer class. Counting a prefix
    on its own gives the tokens it has inside the whole prompt because neither BPE nor the unigram
    model merges across a pre-token boundary (above); a mark inside a pre-token, "(red)dish" (and for
    T5 also "(cat),"), is widened to the whole pre-token, whose pieces depend on all of it."""
    mask = torch.zeros(len(parsed), length, dtype=torch.bool)
    at_spaces = _splits_at_spaces(tokenizer)
    # the prompt's tokens start after the start token: CLIP's <|startoftext|>; T5 has none (its
    # bos_token_id is None, and "" is just </s>)
    start = int(tokenizer("").input_ids[0] == tokenizer.bos_token_id)

    def n_tokens(text):
        # not truncated: a long prompt's count runs past `length` (clipped below); verbose=False
        # keeps the tokenizer from warning that the count exceeds its model_max_length
        return len(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)

    for i, (clean, spans) in enumerate(parsed):
        a, b = spans[int(phrase[i])] if phrase[i] >= 0 else (0, len(clean))
        while _cuts_a_run(clean, a, at_spaces):
            a -= 1
        while _cuts_a_run(clean, b, at_spaces):
            b += 1
        # a prompt truncated to `length` keeps its end token (CLIP's <|endoftext|>, T5's </s>) last
        mask[i, start + n_tokens(clean[:a]):min(start + n_tokens(clean[:b]), length - 1)] = True
    return mask


def weight_embeddings(z, z_empty, token_mask, w):
    """compel-style up-weighting: z_empty + w * (z - z_empty) on the masked token positions, z
    elsewhere. z [B,L,D]; z_empty [1 or B,L,D] (the encoding of ""); token_mask [B,L] bool; w [B].
    Moving away from the empty prompt's embedding (rather than scaling z) keeps the positional
    and padding content that every prompt shares, and strengthens only what the phrase adds."""
    w = torch.as_tensor(w, dtype=z.dtype, device=z.device).reshape(-1, 1, 1)
    weighted = z_empty + w * (z - z_empty)
    # weight 1 keeps z itself, exactly, as compel's identity_mask does (z_empty + 1 (z - z_empty) may round)
    return torch.where(token_mask.to(z.device).unsqueeze(-1) & (w != 1), weighted, z)


def explore_active(epoch, num_epochs, explore_frac=0.75):
    """Explore only during the first `explore_frac` of fine-tuning (epochs counted from 0): the
    last quarter samples as evaluation does, so the model settles on what it found,
    and the samples it is trained on match the ones it is judged by."""
    return epoch < explore_frac * num_epochs
