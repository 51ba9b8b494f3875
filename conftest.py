"""Shared fixtures and helpers of the test files (no test file imports another): the embedded Wikipedia
sample prepared once per session, tiny models, reference computations written out by hand, and a
user-defined mask class such as a researcher would write (README, "Your own mask").

Threads are pinned: on a 2-core machine a test process and the train.py subprocesses it starts would
otherwise each spin one OpenMP thread per core and slow each other down many times over.

Markers: `slow` marks the tests that start subprocesses, compile, or run the study pipeline;
`python -m pytest -q -m "not slow"` is the inner loop, `python -m pytest -q -n 2 --dist loadgroup` runs
everything in two pytest-xdist workers (each test process one thread)."""

import os

os.environ.setdefault('OMP_NUM_THREADS', '1')  # before torch is imported, inherited by subprocesses
os.environ['HF_DATASETS_OFFLINE'] = '1'  # never wait on the Hub in tests

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import model  # noqa: E402
import prepare_wiki  # noqa: E402

torch.set_num_threads(int(os.environ['OMP_NUM_THREADS']))


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook turns the groups into node ids
def pytest_collection_modifyitems(items):
    """Under pytest-xdist (the README's `-n 2 --dist loadgroup`) the tests that share an expensive module
    fixture go to one worker, which builds it once instead of once per worker."""
    for item in items:
        for name in ('dry_report', 'runs'):  # gpu_check's dry run, the trained runs of test_scripts
            if name in item.fixturenames:
                item.add_marker(pytest.mark.xdist_group(name))


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
    """A data_dir holding wiki_sample (train.bin, val.bin, meta.json)."""
    path = tmp_path_factory.mktemp('data')
    prepare_wiki.main(['--source=sample', f'--data_dir={path}'])
    return str(path)


# ---------------------------------------------------------------------------- models and references

SEED_LEARNED = dict(block_size=200, vocab_size=50257, n_layer=26, n_head=9, n_embd=144)
SEED_BASELINE = dict(block_size=200, vocab_size=50257, n_layer=26, n_head=12, n_embd=156)


def tiny(module=model, **kw):
    cfg = dict(block_size=16, vocab_size=97, n_layer=2, n_head=2, n_embd=32)
    cfg.update(kw)
    torch.manual_seed(0)
    return module.GPT(module.GPTConfig(**cfg))


def reference_attention(c_attn, x, n_head):
    """Causal multi-head attention written out with explicit matrices (METHOD.md section 1, step 1)."""
    B, T, C = x.shape
    hs = C // n_head
    q, k, v = (x @ c_attn.weight.T).split(C, dim=2)
    q, k, v = (t.view(B, T, n_head, hs).transpose(1, 2) for t in (q, k, v))
    att = q @ k.transpose(-2, -1) / math.sqrt(hs)
    att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float('-inf'))
    return (att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)


class SigmoidMask(model.LearnedDropout):
    """A user-defined mask, as the README's recipe writes one: M = sigmoid(z + b), overriding only mask."""

    def mask(self, z):
        return torch.sigmoid(z + self.shift)


# every mask class the conformance tests cover, as the GPTConfig settings that choose it
MASK_VARIANTS = {
    'method': dict(),
    'fourier3': dict(mask_fourier_terms=3),
    'soft': dict(mask_rounding='soft'),
    'soft_fourier3': dict(mask_rounding='soft', mask_fourier_terms=3),
    'user_sigmoid': dict(mask_class='conftest.SigmoidMask'),
    'static': dict(mask_class='model.StaticMask'),
    'random': dict(mask_class='model.RandomMask'),
}


def assert_causal(m, mode):
    """Changing token 10 changes no earlier logit (and does change later ones), in train or eval mode."""
    m.train(mode == 'train')
    x = torch.randint(0, 97, (2, 16))
    x2 = x.clone()
    x2[:, 10] = (x2[:, 10] + 1) % 97
    torch.manual_seed(5)
    a, _ = m(x, x)
    torch.manual_seed(5)
    b, _ = m(x2, x2)
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def full_recompute_greedy(m, idx, n):
    for _ in range(n):
        logits, _ = m(idx[:, -m.config.block_size:])
        idx = torch.cat((idx, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return idx


def sharpen(m, factor=8):
    """Larger weights (matrices and expert stacks): varied greedy tokens and decisive routing."""
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.mul_(factor)
    return m


def assert_kv_cache_matches_full_recompute(m):
    m.eval()
    idx = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    # step by step through the cache vs one full forward: same logits at every position
    full, _ = m(idx.repeat(1, 3), idx.repeat(1, 3))
    cache = model.KVCache()
    steps = [m(idx.repeat(1, 3)[:, t:t + 1], kv_cache=cache)[0] for t in range(15)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
    # greedy decoding: identical tokens, until block_size (16) and well beyond it
    out = m.generate(idx, 30, top_k=1)
    assert torch.equal(out, full_recompute_greedy(m, idx, 30))
    assert len(set(out[:, 5:].flatten().tolist())) > 3  # varied tokens: a meaningful comparison
    return out
