"""explore.py: the DiffExp CFG schedule, phrase markup, random weights and the explore switch."""
import pytest
import torch

import explore


def test_cfg_schedule_boundary():
    t = torch.tensor([999, 801, 800, 799, 1, 0])
    got = explore.cfg_schedule(t, w_high=5.0, w_low=1.0, t_thres=800)
    # strictly above the threshold is the noisy start (w_low); t_thres itself is already guided
    assert got.tolist() == [1.0, 1.0, 5.0, 5.0, 5.0, 5.0]
    assert got.dtype.is_floating_point and got.shape == t.shape
    assert explore.cfg_schedule(t, 7.5, w_low=0.0, t_thres=900).tolist() == [0.0, 7.5, 7.5, 7.5, 7.5, 7.5]


def test_cfg_schedule_on_sd15s_50_ddim_steps():
    """SD 1.5's scheduler config (its scheduler_config.json: scaled_linear betas, steps_offset 1,
    "leading" spacing) at 50 DDIM steps samples at t = 981, 961, ..., 1, in the 0-999 training units
    that t_thres = 800 is stated in: the first ten steps, t = 981 down to 801, get w_low."""
    from diffusers import DDIMScheduler
    s = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                      set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    s.set_timesteps(50)
    got = explore.cfg_schedule(s.timesteps, w_high=7.5, w_low=1.0, t_thres=800)
    low = [i for i, w in enumerate(got.tolist()) if w == 1.0]
    assert low == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert s.timesteps[low].tolist() == [981, 961, 941, 921, 901, 881, 861, 841, 821, 801]
    assert got[10:].tolist() == [7.5] * 40 and s.timesteps[10] == 781


@pytest.mark.parametrize("prompt,clean,phrases", [
    ("a cat", "a cat", []),
    ("", "", []),
    ("a (dolphin) (riding a bike)", "a dolphin riding a bike", ["dolphin", "riding a bike"]),
    ("(red circle) on a (dark background)", "red circle on a dark background", ["red circle", "dark background"]),
    ("a ( cat )", "a  cat ", ["cat"]),
    ("(red)dish", "reddish", ["red"]),
])
def test_parse_phrases(prompt, clean, phrases):
    assert explore.parse_phrases(prompt) == (clean, phrases)
    got_clean, spans = explore.parse_spans(prompt)
    assert [got_clean[a:b] for a, b in spans] == phrases


@pytest.mark.parametrize("prompt,word", [
    ("a ((cat))", "nested"), ("a (big (cat))", "nested"), ("a (cat", "unbalanced"),
    ("a cat)", "unbalanced"), ("a )cat(", "unbalanced"), ("a () cat", "empty"), ("a (  ) cat", "empty"),
])
def test_parse_phrases_errors(prompt, word):
    with pytest.raises(ValueError, match=word):
        explore.parse_phrases(prompt)


def test_draw_weights_range_choice_and_reproducibility():
    prompts = ["a (dolphin) (riding a bike)", "a cat", "(red) (circle) on (dark)"] * 200
    phrase, w = explore.draw_weights(prompts, torch.Generator().manual_seed(0))
    assert phrase.shape == w.shape == (600,)
    assert ((w >= 1.0) & (w <= 1.2)).all() and w.std() > 0.03  # U(1, 1.2) has std 0.058
    assert (phrase[1::3] == -1).all()  # unmarked: the whole prompt
    assert set(phrase[0::3].tolist()) == {0, 1} and set(phrase[2::3].tolist()) == {0, 1, 2}
    # the same seed gives the same draw; the next call from the same generator a fresh one
    g = torch.Generator().manual_seed(0)
    first = explore.draw_weights(prompts, g)
    second = explore.draw_weights(prompts, g)
    assert torch.equal(first[0], phrase) and torch.equal(first[1], w)
    assert not torch.equal(first[1], second[1])


def test_draw_weights_rejects_bad_markup():
    with pytest.raises(ValueError, match="unbalanced"):
        explore.draw_weights(["a (cat"])


def compel_weighted(encoder, tokenizer, fragments, length):
    """compel's prompt weighting, transcribed from compel 2.5.1 (damian0815/compel,
    compel/embeddings_provider.py): each (text, weight) fragment is tokenized on its own and the ids
    joined between <|startoftext|> and <|endoftext|>, padded (get_token_ids_and_expand_weights); the
    empty prompt is those two tokens and padding (the empty_z property); and
    build_weighted_embedding_tensor computes
        z_with_all_weights_applied = empty_z + (z_delta_from_empty * batch_weights_expanded)
        this_weighted_z = torch.where(identity_mask, z, z_with_all_weights_applied)
    with identity_mask where the weight is 1. "a red (circle)1.1" is [("a red", 1), ("circle", 1.1)]."""
    ids, weights = [tokenizer.bos_token_id], [1.0]
    for text, weight in fragments:
        piece = tokenizer(text, add_special_tokens=False).input_ids
        ids, weights = ids + piece, weights + [weight] * len(piece)
    pad = length - len(ids) - 1
    ids, weights = ids + [tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad, weights + [1.0] * (pad + 1)
    empty = [tokenizer.bos_token_id, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * (length - 2)
    with torch.no_grad():
        z, empty_z = encoder(torch.tensor([ids]))[0], encoder(torch.tensor([empty]))[0]
    batch_weights_expanded = torch.tensor(weights).reshape(1, -1, 1).expand(z.shape)
    z_delta_from_empty = z - empty_z
    z_with_all_weights_applied = empty_z + (z_delta_from_empty * batch_weights_expanded)
    return torch.where(batch_weights_expanded == 1, z, z_with_all_weights_applied)


def test_prompt_weighting_is_compels():
    """DiffExp weights a phrase "compel-style" (Chae et al., Sec. 3): the embeddings of
    "a red (circle) on a (dark) background" with the first phrase drawn at w = 1.1 are compel's for
    "a red (circle)1.1 on a dark background" (a rule such as w * z, or weighting other tokens, differs)."""
    import types
    from transformers import CLIPTextConfig, CLIPTextModel
    from shapes.models import clip_tokenizer
    import sampling
    torch.manual_seed(0)
    enc = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, max_position_embeddings=16)).eval()
    tok = clip_tokenizer(16)
    pipe = types.SimpleNamespace(tokenizer=tok, text_encoder=enc)
    got = sampling.encode_prompts(pipe, ["a red (circle) on a (dark) background"], (torch.tensor([0]), torch.tensor([1.1])))
    want = compel_weighted(enc, tok, [("a red", 1.0), ("circle", 1.1), ("on a dark background", 1.0)], 16)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    plain = sampling.encode_prompts(pipe, ["a red circle on a dark background"])
    assert (got != plain).any(-1)[0].nonzero().flatten().tolist() == [3]  # "circle", and only it


def test_phrase_mask_positions():
    from shapes.models import clip_tokenizer
    tok = clip_tokenizer(77)
    parsed = [explore.parse_spans(p) for p in ["a (dolphin) (riding a bike)"] * 3 + ["a red(dish) circle"]]
    got = explore.phrase_mask(tok, parsed, torch.tensor([0, 1, -1, 0]), 77)
    # <|startoftext|> a dolphin riding a bike <|endoftext|>; "reddish" is one BPE token, so a mark
    # inside it weights the whole token (counting "a red" alone would give two tokens, then none)
    assert [m.nonzero().flatten().tolist() for m in got] == [[2], [3, 4, 5], [1, 2, 3, 4, 5], [2]]
    # a prompt truncated to 8 tokens keeps its end token (position 7) unweighted
    long = [explore.parse_spans("(a b c d e f g h i j)")]
    assert explore.phrase_mask(tok, long, torch.tensor([0]), 8)[0].nonzero().flatten().tolist() == [1, 2, 3, 4, 5, 6]


def overlap_mask(tokenizer, clean, span, length):
    """The phrase's tokens by the direct rule, which needs a tokenizer that returns character offsets:
    a token belongs to the phrase if its characters overlap the phrase's (special tokens have none)."""
    offsets = tokenizer(clean, padding="max_length", max_length=length, truncation=True,
                        return_offsets_mapping=True).offset_mapping
    return torch.tensor([e > s and s < span[1] and e > span[0] for s, e in offsets])


def all_project_prompts():
    import prompt_sets
    return sorted({p for prompts in prompt_sets.prompt_sets().values() for p in prompts})


def test_phrase_mask_is_the_tokens_overlapping_the_phrase_on_every_project_prompt():
    """phrase_mask counts the tokens of pieces of the prompt, so that tokenizers without character
    offsets (transformers 4.x's slow CLIPTokenizer; tests/test_shapes.py checks it there) weight
    the same tokens; every phrase choice of every prompt in the project's prompt sets (prompts.txt
    and the derived ones) gives the tokens the offsets give."""
    from shapes.models import clip_tokenizer
    tok = clip_tokenizer(77)
    prompts = all_project_prompts()
    assert len(prompts) > 400
    for p in prompts:
        clean, spans = explore.parse_spans(p)
        for k, span in enumerate(spans + [(0, len(clean))]):
            got = explore.phrase_mask(tok, [(clean, spans)], torch.tensor([k if k < len(spans) else -1]), 77)[0]
            assert torch.equal(got, overlap_mask(tok, clean, span, 77)), (p, k)


def test_explore_active_first_three_quarters():
    assert [explore.explore_active(e, 8) for e in range(8)] == [True] * 6 + [False] * 2
    assert [explore.explore_active(e, 4) for e in range(4)] == [True] * 3 + [False]
    assert not any(explore.explore_active(e, 10, explore_frac=0.0) for e in range(10))
    assert all(explore.explore_active(e, 10, explore_frac=1.0) for e in range(10))
