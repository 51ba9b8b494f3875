"""The chunked output layer (baseline_model.chunked_cross_entropy, model(idx, targets, return_logits=False)), on
CPU: the same loss and gradients as the full (B, T, vocab) logits and F.cross_entropy(ignore_index=-1), in
float32 and under bf16 autocast (the function in fp16 too), with ignored targets and a chunk size that does
not divide the token count, for the baseline, learned and MoE models; no gradient work under no_grad; no
graph break under torch.compile(fullgraph=True).

Tolerances: float32, the loss to rel 1e-6 and gradients to 1e-5 of their largest element (only the order of
the sums differs; measured: below 1e-6). Under autocast the logits are the same low-precision products, so the
loss stays at float32's 1e-6. The gradients follow the full path's backward (same g = (p - onehot) / count,
rounded to the same dtype, same products), but W's is summed over chunks in float32 where the full path
rounds one product to bf16: they agree to 2^-7 of their largest element in bf16 (measured: below 4.3e-3,
the tied embedding's being the furthest), 2^-9 in fp16."""

import math

import pytest
import torch
import torch.nn.functional as F

import baseline_model
import model
import moe_model
from baseline_model import ChunkedCrossEntropy, chunked_cross_entropy
from conftest import tiny

MODELS = {'baseline': (baseline_model, dict(dropout=0.1)),
          'learned': (model, dict(shift_init=math.pi / 2)),
          'moe': (moe_model, dict(n_expert=4, expert_top_k=2, router_z_coeff=1e-3))}
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -9}  # of the largest element of the full path's gradient


def autocast(dtype):
    return torch.autocast('cpu', dtype=dtype, enabled=dtype != torch.float32)


def assert_grads_close(grads, ref, dtype, what=''):
    for name in ref:
        tol = GRAD_TOL[dtype] * ref[name].abs().max().item()
        torch.testing.assert_close(grads[name], ref[name], rtol=0, atol=tol, msg=lambda m: f'{what} {name}: {m}')


def data(N=37, C=16, V=101, seed=0):
    """h (N, C), W (V, C) and targets with every 5th ignored (-1)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, C, generator=g).requires_grad_()
    w = (torch.randn(V, C, generator=g) * 0.5).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    t[::5] = -1
    return h, w, t


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize('chunk', [1, 8, 36, 37, 100])
def test_function_matches_full_cross_entropy(dtype, chunk):
    h, w, t = data()
    with autocast(dtype):
        ref = F.cross_entropy(F.linear(h, w), t, ignore_index=-1)
        loss = chunked_cross_entropy(h, w, t, chunk_tokens=chunk)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    ref_grads = dict(zip('hw', torch.autograd.grad(ref, (h, w))))
    grads = dict(zip('hw', torch.autograd.grad(loss, (h, w))))
    assert grads['h'].dtype == grads['w'].dtype == torch.float32
    assert torch.equal(grads['h'][::5], torch.zeros_like(grads['h'][::5]))  # ignored targets: no gradient
    assert_grads_close(grads, ref_grads, dtype)


def test_function_scales_by_grad_output_and_needs_only_what_requires_grad():
    h, w, t = data()
    (3.0 * F.cross_entropy(h @ w.T, t, ignore_index=-1)).backward()
    ref_h, ref_w = h.grad, w.grad
    h.grad = w.grad = None
    (3.0 * chunked_cross_entropy(h, w, t, chunk_tokens=8)).backward()
    torch.testing.assert_close(h.grad, ref_h, rtol=0, atol=1e-5 * ref_h.abs().max().item())
    torch.testing.assert_close(w.grad, ref_w, rtol=0, atol=1e-5 * ref_w.abs().max().item())
    # a frozen weight: a gradient for h only
    (gh,) = torch.autograd.grad(chunked_cross_entropy(h, w.detach(), t, chunk_tokens=8), (h,))
    torch.testing.assert_close(gh, ref_h / 3, rtol=0, atol=1e-5 * ref_h.abs().max().item())
    # and a gradient for W only
    (gw,) = torch.autograd.grad(chunked_cross_entropy(h.detach(), w, t, chunk_tokens=8), (w,))
    torch.testing.assert_close(gw, ref_w / 3, rtol=0, atol=1e-5 * ref_w.abs().max().item())


def test_all_targets_ignored_is_nan_as_f_cross_entropy():
    h, w, t = data()
    t = torch.full_like(t, -1)
    assert F.cross_entropy(h @ w.T, t, ignore_index=-1).isnan()
    assert chunked_cross_entropy(h, w, t, chunk_tokens=8).isnan()


def test_no_grad_computes_no_gradient(monkeypatch):
    """Under no_grad (train.py's evaluation) and for inputs that need no gradient, the loss comes from the
    loss-only loop: the autograd.Function, which computes gradients, is never called."""
    h, w, t = data()
    ref = F.cross_entropy(h @ w.T, t, ignore_index=-1)

    def forbidden(*args):
        raise AssertionError('ChunkedCrossEntropy called without a gradient to compute')
    monkeypatch.setattr(ChunkedCrossEntropy, 'apply', forbidden)
    for context in (torch.no_grad(), torch.inference_mode()):
        with context:
            loss = chunked_cross_entropy(h, w, t, chunk_tokens=8)
        assert not loss.requires_grad and loss.grad_fn is None
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=0)
    loss = chunked_cross_entropy(h.detach(), w.detach(), t, chunk_tokens=8)
    assert not loss.requires_grad


def test_default_chunk_size():
    """At the GPT-2 vocabulary a chunk is 1335 tokens (CE_CHUNK_LOGITS = 2^26 logits, 256 MiB in float32);
    never less than one token."""
    assert baseline_model.ce_chunk_tokens(50257) == 1335
    assert baseline_model.ce_chunk_tokens(50257) * 50257 <= baseline_model.CE_CHUNK_LOGITS
    assert baseline_model.ce_chunk_tokens(2 ** 30) == 1


def loss_and_grads(m, x, y, dtype, call=None, **kw):
    """Training-mode loss, 'ce' statistic and every parameter's gradient of m, called as call (default m),
    with the same random draws (dropout, sampled masks) at every call."""
    m.zero_grad()
    torch.manual_seed(7)
    with autocast(dtype):
        logits, loss, stats = (m if call is None else call)(x, y, return_stats=True, **kw)
    loss.backward()
    return logits, loss.detach(), stats['ce'], {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('name', MODELS)
def test_models_chunked_loss_and_gradients_match_the_full_path(name, dtype, monkeypatch):
    module, kw = MODELS[name]
    m = tiny(module, **kw).train()
    monkeypatch.setattr(baseline_model, 'CE_CHUNK_LOGITS', 97 * 5)  # 5 tokens a chunk: 7 chunks of 32 tokens, the last of 2
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 97, (2, 16), generator=g), torch.randint(0, 97, (2, 16), generator=g)
    y[0, :3], y[1, -4:] = -1, -1
    ref_logits, ref_loss, ref_ce, ref_grads = loss_and_grads(m, x, y, dtype)
    logits, loss, ce, grads = loss_and_grads(m, x, y, dtype, return_logits=False)
    assert ref_logits.shape == (2, 16, 97) and logits is None
    assert (loss != ce) == (name != 'baseline')  # the penalty or aux losses are in both
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(ce, ref_ce, rtol=1e-6, atol=0)
    assert list(grads) == list(ref_grads) and len(grads) > 10
    assert_grads_close(grads, ref_grads, dtype, name)
    # evaluation: no_grad, eval mode, the same cross-entropy
    m.eval()
    with torch.no_grad(), autocast(dtype):
        _, eval_ref = m(x, y)
        none, eval_loss = m(x, y, return_logits=False)
    assert none is None and not eval_loss.requires_grad
    torch.testing.assert_close(eval_loss, eval_ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize('name', MODELS)
def test_default_call_and_generation_still_return_logits(name):
    module, kw = MODELS[name]
    m = tiny(module, **kw).eval()
    x = torch.randint(0, 97, (2, 16))
    logits, loss = m(x, return_logits=False)  # no targets: the last position's logits, as generation needs
    assert logits.shape == (2, 1, 97) and loss is None
    assert m(x, x)[0].shape == (2, 16, 97)
    assert m.generate(x[:, :4], 3, top_k=1).shape == (2, 7)


@pytest.mark.slow
def test_compile_fullgraph_chunked_loss(monkeypatch):
    """torch.compile(fullgraph=True) of the learned model's chunked training loss (with statistics): no graph
    break, and the eager full path's loss and gradients, in float32 and under bf16 autocast."""
    monkeypatch.setattr(baseline_model, 'CE_CHUNK_LOGITS', 97 * 5)
    m = tiny(shift_init=math.pi / 2, n_layer=1).train()
    # aot_eager traces the forward and the backward as inductor would (a graph break fails fullgraph
    # there too) without generating C++, which the model tests' compile already covers
    compiled = torch.compile(m, fullgraph=True, backend='aot_eager')
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 97, (2, 16), generator=g), torch.randint(0, 97, (2, 16), generator=g)
    y[0, :3] = -1
    for dtype in (torch.float32, torch.bfloat16):
        ref_logits, ref_loss, ref_ce, ref_grads = loss_and_grads(m, x, y, dtype)
        logits, loss, ce, grads = loss_and_grads(m, x, y, dtype, compiled, return_logits=False)
        assert logits is None
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
        torch.testing.assert_close(ce, ref_ce, rtol=1e-5, atol=0)
        assert_grads_close(grads, ref_grads, dtype, 'compiled')
