"""The offline "shapes" world: synthetic images and captions, a tiny text-to-image latent diffusion
model trained on them, and the world's own rewards. (Being built; see issue 2.)"""
import gzip
import os

import open_clip
from open_clip.tokenizer import bytes_to_unicode
from transformers import CLIPTokenizer


def clip_tokenizer(model_max_length=77):
    """The real CLIP BPE tokenizer (49408 tokens, as SD 1.5's), built offline from the vocabulary
    that ships inside open_clip. transformers 5 needs `vocab=`/`merges=` (the old `vocab_file=`
    names are silently ignored and give garbage ids)."""
    path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]  # as open_clip/CLIP read it
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges,
                        model_max_length=model_max_length)
    assert len(tok) == 49408, len(tok)
    return tok
