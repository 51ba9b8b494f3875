"""
The GPT-2 tokenizer, offline: a tiktoken Encoding built from the byte-pair ranks vendored in
assets/ (tiktoken.get_encoding("gpt2") would download them). See assets/LICENSE-gpt2-tiktoken.txt.
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
