"""
The GPT-2 tokenizer, offline: a tiktoken Encoding built from the byte-pair ranks vendored in
assets/ (tiktoken.get_encoding("gpt2") would download them), and its cut to the first n ranks
(a small vocabulary without an "other" bucket). See assets/LICENSE-gpt2-tiktoken.txt.
"""

import base64
import gzip
import hashlib
import os
from functools import lru_cache

RANKS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets', 'gpt2.tiktoken.gz')
RANKS_SHA256 = '306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930'
EOT = 50256  # <|endoftext|>
# GPT-2's pre-tokenizer regex (tiktoken's r50k pattern)
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class TokenizerError(RuntimeError):
    pass


def load_ranks(path=RANKS_PATH):
    """{token bytes: rank} from the gzipped ranks file, after checking its sha256."""
    try:
        with gzip.open(path, 'rb') as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise TokenizerError(f"cannot read the GPT-2 ranks file {path}: {e}; restore it with "
                             f"'git checkout -- assets/gpt2.tiktoken.gz'") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != RANKS_SHA256:
        raise TokenizerError(f"the GPT-2 ranks file {path} is corrupted (sha256 {digest[:12]}..., expected "
                             f"{RANKS_SHA256[:12]}...); restore it with 'git checkout -- assets/gpt2.tiktoken.gz'")
    ranks = {}
    for line in raw.splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


@lru_cache(maxsize=None)
def get_gpt2():
    """tiktoken's GPT-2 Encoding (vocabulary 50257, <|endoftext|> = 50256), built offline."""
    import tiktoken
    return tiktoken.Encoding(name='gpt2', pat_str=PAT_STR, mergeable_ranks=load_ranks(),
                             special_tokens={'<|endoftext|>': EOT}, explicit_n_vocab=50257)


@lru_cache(maxsize=None)
def get_gpt2_cut(n):
    """GPT-2's BPE cut to its first n ranks (the 256 byte tokens and the first n - 256 merges), plus
    <|endoftext|> as id n: a byte-level BPE with full coverage and a vocabulary of n + 1, whose ids
    below n are GPT-2's own ids (a word GPT-2 merged later comes out as several of these tokens)."""
    import tiktoken
    if not 256 <= n <= EOT:
        raise TokenizerError(f"a GPT-2 cut needs 256 <= n <= {EOT} ranks (the byte tokens come first), got {n}")
    ranks = {token: rank for token, rank in load_ranks().items() if rank < n}
    return tiktoken.Encoding(name=f'gpt2_cut{n}', pat_str=PAT_STR, mergeable_ranks=ranks,
                             special_tokens={'<|endoftext|>': n}, explicit_n_vocab=n + 1)


def vocab_size_of(tokenizer_cut=None):
    """The number of ids of GPT-2's tokenizer (50257) or of its cut to tokenizer_cut ranks (get_gpt2_cut)."""
    return EOT + 1 if tokenizer_cut is None else tokenizer_cut + 1


def get_codec(vocab_size, tokenizer_cut=None):
    """(encode, decode) between text and a model's token ids: GPT-2's vocabulary, or with
    tokenizer_cut=n (the checkpoint's field, from its data's meta.json) GPT-2's cut to n ranks
    (get_gpt2_cut), whose vocabulary is n + 1."""
    enc = get_gpt2() if tokenizer_cut is None else get_gpt2_cut(int(tokenizer_cut))
    if vocab_size != enc.n_vocab:
        what = (f"GPT-2's {enc.n_vocab}" if tokenizer_cut is None
                else f"the {enc.n_vocab} of GPT-2 cut to {tokenizer_cut} ranks + <|endoftext|>")
        raise TokenizerError(f"the model's vocabulary has {vocab_size} ids, not {what}: its checkpoint does not "
                             f"say which tokenizer made its data (older reduced-vocabulary checkpoints cannot be "
                             f"decoded); retrain it with this train.py")
    special = {'<|endoftext|>'}
    return (lambda text: enc.encode(text, allowed_special=special)), enc.decode
