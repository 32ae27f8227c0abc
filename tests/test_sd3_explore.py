"""DiffExp on SD 3.5: the CFG schedule's threshold on a flow model's noise levels, and the random prompt
weighting on all three encoders' tokens (both CLIPs and T5), the pooled vectors unweighted."""
import json

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

import explore
import sampling
from conftest import tiny_sd3_pipeline
from test_explore import all_project_prompts, overlap_mask

# --------------------------------------------------------------------------------------------
# the CFG schedule: t_thres (DDPM timesteps) -> the flow step's sigma of the same signal-to-noise ratio

# SD 3.5's scheduler_config.json (stabilityai/stable-diffusion-3.5-large, scheduler/), written out here
# (no download): the flow-matching Euler scheduler, 1000 training timesteps, shift 3
SD35_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


def sd35_scheduler(steps):
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(SD35_SCHEDULER)
    scheduler.set_timesteps(steps)
    return scheduler


def sd15_ddim():
    """SD 1.5's scheduler (scheduler_config.json), whose alphas_cumprod DiffExp's t_thres is stated on."""
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


# Computed independently of explore.py, in 30-digit arithmetic (mpmath): alpha_bar_t as the product of
# (1 - beta_i), beta_i = (sqrt(0.00085) + (sqrt(0.012) - sqrt(0.00085)) i / 999)^2; the sigma s solving
# ((1 - s) / s)^2 = alpha_bar / (1 - alpha_bar); SD 3.5's 40 sigmas as diffusers makes them,
# r_i = 1 - (1 - 0.003 / 1.002) i / 39 (the shifted sigma of timestep 1 is 3 * 0.001 / (1 + 2 * 0.001)),
# then shifted once more, s_i = 3 r_i / (1 + 2 r_i).
#   t_thres:       900         800         700
#   alpha_bar:     0.0141511   0.0368696   0.0825209
#   sigma_thres:   0.8930092   0.8363614   0.7692869
SIGMA_THRES = {900: 0.8930092, 800: 0.8363614, 700: 0.7692869}
# the 40 steps' sigmas around the thresholds: step 10, 11 (900); 14, 15 (800); 18, 19 (700)
SIGMAS_40 = {10: 0.8972793, 11: 0.8846372, 14: 0.8433152, 15: 0.8282797, 18: 0.7787375, 19: 0.7605586}


@pytest.mark.parametrize("t_thres,n_low", [(900, 11), (800, 15), (700, 19)])
def test_cfg_schedule_on_sd35s_40_flow_steps(t_thres, n_low):
    """At SD 3.5's 40 steps, t_thres = 900, 800, 700 give w_low to the first 11, 15, 19 steps: those
    noisier than DDPM's t_thres (SD 1.5's 50 DDIM steps give it to their first 5, 10, 15)."""
    assert explore.flow_threshold(t_thres) == pytest.approx(SIGMA_THRES[t_thres], abs=1e-6)
    scheduler = sd35_scheduler(40)
    got = explore.cfg_schedule(scheduler, w_high=4.5, w_low=1.0, t_thres=t_thres)
    assert got.shape == (40,) and got.dtype.is_floating_point
    assert got.tolist() == [1.0] * n_low + [4.5] * (40 - n_low)
    # the last low step and the first guided one sit on either side of the threshold
    last, first = scheduler.sigmas[n_low - 1].item(), scheduler.sigmas[n_low].item()
    assert last == pytest.approx(SIGMAS_40[n_low - 1], abs=1e-6) and first == pytest.approx(SIGMAS_40[n_low], abs=1e-6)
    assert last > SIGMA_THRES[t_thres] > first


def test_the_threshold_has_ddpms_signal_to_noise_ratio():
    """The mapping's definition, checked with diffusers' own SD 1.5 alpha_bar (DDIMScheduler's, float32):
    a flow sample x = (1 - s) x_0 + s eps at s = flow_threshold(t) has SNR ((1 - s) / s)^2, DDPM's x_t
    has a_t / (1 - a_t); they agree at every t, and the threshold falls as t does (less noise)."""
    a = sd15_ddim().alphas_cumprod.double()
    torch.testing.assert_close(explore.sd_alphas_cumprod(), a, rtol=1e-5, atol=0)
    s = torch.tensor([explore.flow_threshold(t) for t in range(1000)], dtype=torch.float64)
    torch.testing.assert_close(((1 - s) / s) ** 2, a / (1 - a), rtol=1e-4, atol=0)
    assert (s.diff() > 0).all()
    # beyond the chain: below 0 every step is noisier than t_thres, from 1000 on none is
    assert explore.flow_threshold(-1) == 0.0 and explore.flow_threshold(1000) == 1.0
    scheduler = sd35_scheduler(40)
    assert explore.cfg_schedule(scheduler, 4.5, 1.0, t_thres=-1).tolist() == [1.0] * 40
    assert explore.cfg_schedule(scheduler, 4.5, 1.0, t_thres=1000).tolist() == [4.5] * 40


def test_cfg_schedule_takes_a_ddim_scheduler_or_its_timesteps_and_refuses_a_flow_models_timesteps():
    ddim = sd15_ddim()
    ddim.set_timesteps(50)
    assert torch.equal(explore.cfg_schedule(ddim, 7.5, 1.0, 800), explore.cfg_schedule(ddim.timesteps, 7.5, 1.0, 800))
    assert explore.cfg_schedule(ddim, 7.5, 1.0, 800).tolist() == [1.0] * 10 + [7.5] * 40
    # SD 3.5's timesteps are sigma * 1000: compared with t_thres as DDPM's they would give w_low to the
    # first 17 steps (sigma > 0.8), not 15; they are refused instead
    with pytest.raises(ValueError, match="pass the scheduler itself"):
        explore.cfg_schedule(sd35_scheduler(40).timesteps, 4.5, 1.0, 800)


# --------------------------------------------------------------------------------------------
# phrase_mask on T5's tokenizer: no start token, the prompt's tokens, then </s>

@pytest.fixture(scope="module")
def pipe():
    return tiny_sd3_pipeline(t5=True)


def rows(mask):
    return [m.nonzero().flatten().tolist() for m in mask]


def test_phrase_mask_on_the_tiny_t5_tokenizer(pipe):
    """The tiny pipeline's T5 tokenizer (a unigram vocabulary of a few words and letters): positions
    worked out by hand from its tokens, which are the phrase's own tokenization."""
    tok = pipe.tokenizer_3
    cases = [  # marked prompt, phrase, its T5 tokens (0 is the prompt's first: T5 has no start token)
        ("a (red) (circle)", 0, [1]),  # ▁a ▁red ▁circle </s>
        ("a (red) (circle)", 1, [2]),
        ("a (red) (circle)", -1, [0, 1, 2]),  # the whole prompt, not </s>
        ("a (dolphin) (riding a bike)", 1, [2, 3, 4]),  # ▁a ▁dolphin ▁riding ▁a ▁bike </s>
        ("(a dog) riding", 0, [0, 1, 2, 3, 4]),  # ▁a ▁ d o g ▁riding </s> ("dog" is not in the vocabulary)
        ("a (dog) riding", 0, [1, 2, 3, 4]),
        # a mark inside a word takes the whole word (the test below says why), its punctuation too, as
        # T5 splits text at spaces only (the offsets would give "▁cat" alone: the rule's price)
        ("a red(dish) cat", 0, [1, 2, 3, 4, 5]),  # ▁a ▁red d i s h ▁cat
        ("a (cat), a dog", 0, [1, 2]),  # ▁a ▁cat <unk> ▁a ▁ d o g
    ]
    for prompt, k, want in cases:
        parsed = explore.parse_spans(prompt)
        got = explore.phrase_mask(tok, [parsed], torch.tensor([k]), sampling.T5_TOKENS)
        assert rows(got) == [want], prompt
        ids = tok(parsed[0]).input_ids
        assert ids[-1] == tok.eos_token_id  # </s> ends the prompt's tokens, never marked
        if k >= 0 and prompt not in ("a red(dish) cat", "a (cat), a dog"):  # the phrase's own tokenization
            phrase = explore.parse_phrases(prompt)[1][k]
            assert [ids[i] for i in want] == tok(phrase, add_special_tokens=False).input_ids
    # a prompt truncated to 8 tokens keeps </s> (position 7) unweighted
    long = [explore.parse_spans("(a a a a a a a a a a)")]
    assert rows(explore.phrase_mask(tok, long, torch.tensor([0]), 8)) == [[0, 1, 2, 3, 4, 5, 6]]
    assert tok("a a a a a a a a a a", max_length=8, truncation=True).input_ids[-1] == tok.eos_token_id


def test_phrase_mask_widens_a_mark_to_t5s_whole_word():
    """Why the mark takes the whole word: T5's unigram model segments a word as a whole, so "cat" alone
    and "cat," need not share their pieces. With pieces "▁ca", "t," and "▁cat", "a cat" is ▁a ▁cat and
    "a cat, a dog" is ▁a ▁ca t, ▁a ▁dog: the phrase "cat" of "a (cat), a dog" is tokens 1 and 2 (both
    overlap it). Counting the tokens of "a cat" on its own (one word piece) would mark token 1 only."""
    from transformers import T5Tokenizer
    pieces = [("▁a", -1.0), ("▁ca", -2.0), ("t,", -2.0), ("▁cat", -3.0), (",", -3.0), ("t", -5.0), ("▁dog", -1.0)]
    tok = T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + pieces, extra_ids=0)
    assert tok.convert_ids_to_tokens(tok("a cat, a dog").input_ids) == ["▁a", "▁ca", "t,", "▁a", "▁dog", "</s>"]
    assert tok.convert_ids_to_tokens(tok("a cat").input_ids) == ["▁a", "▁cat", "</s>"]
    clean, spans = explore.parse_spans("a (cat), a dog")
    assert rows(explore.phrase_mask(tok, [(clean, spans)], torch.tensor([0]), 16)) == [[1, 2]]
    assert rows(overlap_mask(tok, clean, spans[0], 16)[None]) == [[1, 2]]


def project_t5_tokenizer():
    """A T5 tokenizer (T5's pre-tokenizer, Metaspace at whitespace, and its unigram model) with a
    300-piece vocabulary trained here on the project's prompts: most words split into several pieces,
    as rarer words do in T5's own 32k vocabulary, and punctuation and digits are pieces of their own."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Tokenizer
    texts = [explore.parse_spans(p)[0] for p in all_project_prompts()]
    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace()])
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
                                      show_progress=False)
    unigram.train_from_iterator(texts, trainer)
    vocab = [tuple(piece) for piece in json.loads(unigram.to_str())["model"]["vocab"]]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def test_phrase_mask_is_the_t5_tokens_overlapping_the_phrase_on_every_project_prompt():
    """Every phrase choice of every project prompt, on a T5 tokenizer that splits words into pieces:
    the mask is the tokens whose character offsets (the fast tokenizer's) overlap the phrase, and
    those are the phrase's own tokenization."""
    tok = project_t5_tokenizer()
    assert tok.bos_token_id is None and tok("").input_ids == [tok.eos_token_id]
    assert len(tok("a kitten licking a baby duck", add_special_tokens=False).input_ids) > 6  # pieces, not words
    for p in all_project_prompts():
        clean, spans = explore.parse_spans(p)
        ids = tok(clean, padding="max_length", max_length=sampling.T5_TOKENS, truncation=True).input_ids
        for k, span in enumerate(spans + [(0, len(clean))]):
            got = explore.phrase_mask(tok, [(clean, spans)], torch.tensor([k if k < len(spans) else -1]),
                                      sampling.T5_TOKENS)[0]
            assert torch.equal(got, overlap_mask(tok, clean, span, sampling.T5_TOKENS)), (p, k)
            phrase_ids = tok(clean[span[0]:span[1]], add_special_tokens=False).input_ids
            assert [ids[i] for i in got.nonzero().flatten().tolist()] == phrase_ids, (p, k)


# --------------------------------------------------------------------------------------------
# encode_prompts on SD 3.5: the phrase's tokens of both CLIPs and of T5 weighted, the pooled vectors not

T5_FIRST = 16  # the tiny pipeline's 16 CLIP tokens, then T5's 256, in the record
PROMPTS = ["a (red) (circle)", "a (dolphin) (riding a bike)", "(a dog) riding", "a (blue) (square)"]
PHRASE = torch.tensor([0, 1, 0, -1])
# the chosen phrase's positions in each encoder, by hand from the tokenizers' tokens:
# CLIP: <|startoftext|> a red circle <|endoftext|> ...; T5: ▁a ▁red ▁circle </s> ... (test above)
CLIP_POS = [[2], [3, 4, 5], [1, 2], [1, 2, 3]]
T5_POS = [[1], [2, 3, 4], [0, 1, 2, 3, 4], [0, 1, 2]]


def test_weight_one_is_exactly_the_unweighted_record(pipe):
    plain = sampling.encode_prompts(pipe, PROMPTS)
    ones = sampling.encode_prompts(pipe, PROMPTS, (PHRASE, torch.ones(4)))
    assert set(ones) == {"embeds", "pooled"}
    assert torch.equal(ones["embeds"], plain["embeds"]) and torch.equal(ones["pooled"], plain["pooled"])


def test_a_weight_changes_only_the_phrases_tokens_of_every_encoder(pipe):
    plain = sampling.encode_prompts(pipe, PROMPTS)
    w = torch.tensor([1.2, 1.1, 1.15, 1.05])
    got = sampling.encode_prompts(pipe, PROMPTS, (PHRASE, w))
    assert torch.equal(got["pooled"], plain["pooled"])  # the pooled vectors stay the clean prompt's
    changed = (got["embeds"] != plain["embeds"])  # [B, 16 + 256, 48]
    want = [c + [T5_FIRST + i for i in t] for c, t in zip(CLIP_POS, T5_POS)]
    assert rows(changed.any(-1)) == want  # every other row is exactly the unweighted one
    clip = changed[:, :T5_FIRST]
    for b in range(4):  # on the phrase's CLIP rows, both encoders' features (16 + 24), not the zero padding
        assert clip[b, CLIP_POS[b], :16].any(-1).all() and clip[b, CLIP_POS[b], 16:40].any(-1).all()
        assert not clip[b, :, 40:].any() and not got["embeds"][b, :T5_FIRST, 40:].any()
    # the T5 rows are compel's rule on the pipeline's own T5 states: z_empty + w (z - z_empty)
    with torch.no_grad():  # the pipeline's encode_prompt, its negative prompt "": CLIP's 16 rows, then T5's
        embeds, negative, _, _ = pipe.encode_prompt([explore.parse_spans(p)[0] for p in PROMPTS], None, None,
                                                    device="cpu")
    z, z_empty = embeds[:, T5_FIRST:], negative[:, T5_FIRST:]
    for b in range(4):
        pos = T5_POS[b]
        want_rows = z_empty[0, pos] + w[b] * (z[b, pos] - z_empty[0, pos])
        torch.testing.assert_close(got["embeds"][b, [T5_FIRST + i for i in pos]], want_rows, rtol=1e-6, atol=1e-6)


def test_phrase_positions_in_the_pipelines_clip_and_t5_tokens(pipe):
    """CLIP_POS and T5_POS above are the phrases' places in the tokenizers' own token lists."""
    clean = [explore.parse_spans(p)[0] for p in PROMPTS]
    marked = [explore.parse_phrases(p)[1] for p in PROMPTS]
    for b, text in enumerate(clean):
        phrase = marked[b][PHRASE[b]] if PHRASE[b] >= 0 else text
        for tok, pos in ((pipe.tokenizer, CLIP_POS[b]), (pipe.tokenizer_2, CLIP_POS[b]), (pipe.tokenizer_3, T5_POS[b])):
            ids = tok(text).input_ids
            assert [ids[i] for i in pos] == tok(phrase, add_special_tokens=False).input_ids, (text, phrase)
