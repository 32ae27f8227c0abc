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


def test_cfg_schedule_on_scheduler_timesteps():
    from diffusers import DDIMScheduler
    s = DDIMScheduler(timestep_spacing="trailing")
    s.set_timesteps(20)
    got = explore.cfg_schedule(s.timesteps, 5.0)
    want = [1.0 if int(t) > 800 else 5.0 for t in s.timesteps]
    assert got.tolist() == want and 0 < want.count(1.0) < 20


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


def test_weight_embeddings_on_tiny_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel
    from shapes.models import clip_tokenizer
    torch.manual_seed(0)
    enc = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, max_position_embeddings=16)).eval()
    tok = clip_tokenizer(16)
    ids = tok(["a red circle", "a blue square", ""], padding="max_length", max_length=16, return_tensors="pt").input_ids
    with torch.no_grad():
        z_all = enc(ids)[0]
    z, z_empty = z_all[:2], z_all[2:]
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, 2:4] = True  # "red circle"
    mask[1, 1:2] = True  # "a"
    w = torch.tensor([1.15, 1.05])
    got = explore.weight_embeddings(z, z_empty, mask, w)
    for b in range(2):
        for j in range(16):
            want = z_empty[0, j] + w[b] * (z[b, j] - z_empty[0, j]) if mask[b, j] else z[b, j]
            torch.testing.assert_close(got[b, j], want)
    assert not torch.allclose(got[0, 2:4], z[0, 2:4])  # the weight did something where asked
    torch.testing.assert_close(explore.weight_embeddings(z, z_empty, torch.ones(2, 16, dtype=torch.bool),
                                                         torch.ones(2)), z)  # w = 1 changes nothing


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
