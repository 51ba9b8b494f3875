"""
The GPT-2 tokenizer, offline: a tiktoken Encoding built from the byte-pair ranks vendored in
assets/ (tiktoken.get_encoding("gpt2") would download them). See assets/LICENSE-gpt2-tiktoken.txt.
"""

import base64
import gzip
import hashlib
import os
from functools import lru_cache

import numpy as np

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


def reduced_id_map(gpt2_ids, n_vocab=50257):
    """(n_vocab,) table GPT-2 id -> reduced id: gpt2_ids[i] -> i, every other id -> len(gpt2_ids).
    reproduce.py re-encodes its data this way; the table turns GPT-2 ids into the model's."""
    table = np.full(n_vocab, len(gpt2_ids), dtype=np.int64)
    table[np.asarray(gpt2_ids, dtype=np.int64)] = np.arange(len(gpt2_ids))
    return table


def get_codec(vocab_size, gpt2_ids=None):
    """(encode, decode) between text and a model's token ids. The model's vocabulary is GPT-2's, or,
    with gpt2_ids (a model trained on reproduce.py's re-encoded data), id i is GPT-2 id gpt2_ids[i]
    and id len(gpt2_ids) stands for every other token; it decodes as U+FFFD."""
    enc = get_gpt2()
    special = {'<|endoftext|>'}
    if gpt2_ids is None:
        if vocab_size != enc.n_vocab:
            raise TokenizerError(f"the model's vocabulary has {vocab_size} ids, not GPT-2's {enc.n_vocab}, and its "
                                 f"checkpoint carries no id map (gpt2_ids) to translate them; retrain it with "
                                 f"this train.py, which stores the map of re-encoded data (reproduce.py's)")
        return (lambda text: enc.encode(text, allowed_special=special)), enc.decode
    gpt2_ids = np.asarray(gpt2_ids).tolist()
    other = len(gpt2_ids)
    if vocab_size != other + 1:
        raise TokenizerError(f"the checkpoint's id map covers {other + 1} ids but the model has {vocab_size}")
    table = reduced_id_map(gpt2_ids, enc.n_vocab)

    def encode(text):
        return table[enc.encode(text, allowed_special=special)].tolist()

    def decode(ids):
        parts, run = [], []
        for i in ids:
            if i == other:
                parts.append(enc.decode(run))
                run = []
            else:
                run.append(gpt2_ids[i])
        return '\N{REPLACEMENT CHARACTER}'.join(parts + [enc.decode(run)])

    return encode, decode
