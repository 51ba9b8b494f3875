"""model.py and baseline_model.py, on CPU: the method's specification as tests.

The method: the mask formula against a hand-written attention, the block masking its own MLP output
with no rescaling, the penalty's value and gradient, the write-up's detach construction, the shift's
init and range, the statistics. Every mask class (the method, Fourier, soft, both, and a user-defined
subclass from conftest.py): M = mask(causal attention), binary R in fp32/bf16/fp16, E[R] = M with
independent draws (training and stochastic inference), dR/dM = 1, causality, KV cache = full recompute.
The baseline: every dropout site in training, none in eval. The GPT: init, seed parameter counts,
bf16 CPU attention against float32, generation (KV cache, sampling distribution), overfitting one batch,
a fullgraph compile equal to eager, and bit-identity of the default models with the v2 study's code."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

import baseline_model
import model
from conftest import (MASK_VARIANTS, SEED_BASELINE, SEED_LEARNED, assert_causal,
                      assert_kv_cache_matches_full_recompute, full_recompute_greedy, reference_attention, sharpen, tiny)
from model import GPT, GPTConfig, LearnedDropout

# ---------------------------------------------------------------------------- sizes, init

def test_seed_parameter_counts():
    with torch.device('meta'):  # sizes only: no memory, no init work
        assert GPT(GPTConfig(**SEED_LEARNED)).get_num_params() == 15_335_424
        assert baseline_model.GPT(baseline_model.GPTConfig(**SEED_BASELINE)).get_num_params() == 15_441_192


@pytest.mark.parametrize('module', [model, baseline_model])
def test_loss_at_init_is_log_vocab(module):
    m = tiny(module, vocab_size=50257, n_embd=64, n_layer=4, n_head=4, block_size=64)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 50257, (8, 64), generator=g)
    y = torch.randint(0, 50257, (8, 64), generator=g)
    m.eval()
    _, loss = m(x, y)
    assert abs(loss.item() - math.log(50257)) < 0.2


def test_init_follows_spec():
    m = GPT(GPTConfig(**SEED_LEARNED))
    assert m.lm_head.weight is m.transformer.wte.weight
    ld = m.transformer.h[0].learned_dropout
    assert ld.c_attn.bias is None and ld.c_attn.weight.shape == (432, 144)
    assert ld.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    for proj in (m.transformer.h[0].mlp.c_proj.weight, m.transformer.h[0].attn.c_proj.weight):
        assert proj.std().item() == pytest.approx(0.02 / math.sqrt(2 * 26), rel=0.05)
    assert m.transformer.h[0].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert all(not isinstance(mod, torch.nn.Dropout) or mod.p == 0 for mod in m.modules())


@pytest.mark.parametrize('bad', [-0.1, math.pi + 1e-3, 4.0])
def test_shift_init_outside_0_pi_rejected(bad):
    with pytest.raises(ValueError, match=r'shift_init must be in \[0, pi\]'):
        GPTConfig(shift_init=bad)


def test_shift_is_per_channel_and_initialised():
    m = tiny(shift_init=math.pi / 2)
    for block in m.transformer.h:
        assert block.learned_dropout.shift.shape == (32,)
        assert torch.all(block.learned_dropout.shift == torch.tensor(math.pi / 2))


def test_weight_decay_only_on_matrices():
    m = tiny()
    opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    decayed, plain = opt.param_groups
    assert decayed['weight_decay'] == 0.1 and plain['weight_decay'] == 0.0
    assert all(p.dim() >= 2 for p in decayed['params'])
    shifts = {id(b.learned_dropout.shift) for b in m.transformer.h}
    assert shifts <= {id(p) for p in plain['params']}
    n_opt = sum(p.numel() for g in opt.param_groups for p in g['params'])
    assert n_opt == sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------------------- LearnedDropout

def test_mask_formula_matches_spec():
    cfg = GPTConfig(n_embd=12, n_head=3, shift_init=1.0)
    torch.manual_seed(0)
    ld = LearnedDropout(cfg).eval()
    x = torch.randn(2, 7, 12)
    y, m, _ = ld(x)
    z = reference_attention(ld.c_attn, x, 3)
    m_ref = 0.5 * torch.cos(z + 1.0) + 0.5
    torch.testing.assert_close(m, m_ref, rtol=1e-5, atol=1e-6)
    # eval: deterministic rounding, no rescaling
    assert torch.equal(y, x * (m >= 0.5).float())


def test_dropout_n_head_is_used():
    cfg = GPTConfig(n_embd=12, n_head=3, dropout_n_head=2)
    torch.manual_seed(0)
    ld = LearnedDropout(cfg).eval()
    x = torch.randn(2, 5, 12)
    _, m, _ = ld(x)
    torch.testing.assert_close(m, 0.5 * torch.cos(reference_attention(ld.c_attn, x, 2)) + 0.5)


def test_bf16_model_never_keeps_a_channel_with_m_zero():
    """The noise is drawn in float32: bf16 uniform draws are 0 often enough (1 in 256) that channels with
    M = 0 would be kept about 0.2% of the time in a model cast to bf16."""
    ld = LearnedDropout(GPTConfig(n_embd=64, n_head=4, shift_init=math.pi)).train().to(torch.bfloat16)
    torch.nn.init.zeros_(ld.c_attn.weight)  # z = 0, M = 0.5 cos(pi) + 0.5 = 0
    x = torch.ones(64, 64, 64, dtype=torch.bfloat16)
    torch.manual_seed(0)
    _, m, r = ld(x)
    assert m.float().max() < 1e-5
    assert r.float().mean().item() < 1e-4


def test_straight_through_gradient():
    torch.manual_seed(0)
    ld = LearnedDropout(GPTConfig(n_embd=12, n_head=3, shift_init=0.7)).train()
    x = torch.randn(2, 6, 12)
    g = torch.randn(2, 6, 12)
    y, m, _ = ld(x)
    (y * g).sum().backward()
    # by hand: dL/dR = g * x, dR/dM = 1, dM/dshift = -0.5 sin(z + shift)
    z = reference_attention(ld.c_attn, x, 3).detach()
    expected = (g * x * (-0.5 * torch.sin(z + 0.7))).sum((0, 1))
    torch.testing.assert_close(ld.shift.grad, expected, rtol=1e-4, atol=1e-6)


def test_matches_the_write_ups_detach_construction():
    """R = M + (1-M).detach() where N <= M, else M - M.detach(): same forward, same gradients."""
    torch.manual_seed(0)
    ld = LearnedDropout(GPTConfig(n_embd=12, n_head=3, shift_init=0.7)).train()
    x = torch.randn(2, 6, 12, requires_grad=True)
    g = torch.randn(2, 6, 12)
    torch.manual_seed(1)
    y, _, _ = ld(x)
    (y * g).sum().backward()
    ours = [t.grad.clone() for t in (x, ld.shift, ld.c_attn.weight)]
    for t in (x, ld.shift, ld.c_attn.weight):
        t.grad = None
    torch.manual_seed(1)
    m = 0.5 * torch.cos(reference_attention(ld.c_attn, x, 3) + ld.shift) + 0.5
    r = torch.where(torch.rand_like(m) <= m, m + (1 - m).detach(), m - m.detach())
    (x * r * g).sum().backward()
    assert torch.equal(y, x * r)
    for a, t in zip(ours, (x, ld.shift, ld.c_attn.weight)):
        torch.testing.assert_close(a, t.grad, rtol=1e-5, atol=1e-6)


def test_stochastic_inference_option():
    """Eval masks are deterministic by default; set_mask_mode('stochastic') makes every layer sample
    them (conformance tests check the draws follow Bernoulli(M)); 'deterministic' restores the default."""
    m = tiny(shift_init=math.pi / 2).eval()
    x = torch.randint(0, 97, (2, 16))
    det1, _ = m(x, x)
    assert torch.equal(det1, m(x, x)[0])  # eval is deterministic by default
    m.set_mask_mode('stochastic')
    assert all(b.learned_dropout.stochastic_inference for b in m.transformer.h)
    torch.manual_seed(1)
    sto1, _ = m(x, x)
    torch.manual_seed(2)
    assert not torch.equal(sto1, m(x, x)[0])
    m.set_mask_mode('deterministic')
    assert torch.equal(m(x, x)[0], det1)
    with pytest.raises(ValueError, match='mask mode'):
        m.set_mask_mode('random')


# ---------------------------------------------------------------------------- every mask class
# The method's contract (METHOD.md section 1) for the method, its variants and a user-defined subclass:
# M = mask(z) in [0, 1] with z the causal attention of the input; R binary in every dtype (R = M for the
# soft control); E[R] = M; dR/dM = 1; the model stays causal and its KV cache exact.

SOFT = {v for v, kw in MASK_VARIANTS.items() if issubclass(GPTConfig(**kw).mask_type(), model.SoftMask)}  # R = M
HARD = [v for v in MASK_VARIANTS if v not in SOFT]


def mask_module(variant, n_embd=16, shift_init=math.pi / 2):
    cfg = GPTConfig(n_embd=n_embd, n_head=2, shift_init=shift_init, **MASK_VARIANTS[variant])
    torch.manual_seed(0)
    return cfg.mask_type()(cfg)


def test_mask_classes_are_the_configured_ones():
    import conftest
    expected = {'method': model.LearnedDropout, 'fourier3': model.FourierMask, 'soft': model.SoftMask,
                'soft_fourier3': model.SoftFourierMask, 'user_sigmoid': conftest.SigmoidMask,
                'static': model.StaticMask, 'random': model.RandomMask}
    assert set(expected) == set(MASK_VARIANTS)
    for variant, cls in expected.items():
        assert type(mask_module(variant)) is cls
        assert all(type(b.learned_dropout) is cls for b in tiny(**MASK_VARIANTS[variant]).transformer.h)
    for bad, match in [('nodots', "'module.Class'"), ('no_such_module.Mask', 'cannot import no_such_module'),
                       ('conftest.NoSuchClass', 'has no NoSuchClass'), ('conftest.tiny', 'subclass of model.LearnedDropout')]:
        with pytest.raises(ValueError, match=match):
            GPTConfig(mask_class=bad)
    with pytest.raises(ValueError, match="mask_rounding='soft' needs a SoftMask"):
        GPTConfig(mask_class='conftest.SigmoidMask', mask_rounding='soft')
    with pytest.raises(ValueError, match='mask_fourier_terms=3 needs a FourierMask'):
        GPTConfig(mask_class='conftest.SigmoidMask', mask_fourier_terms=3)
    # a subclass of a variant takes that variant's settings
    assert GPTConfig(mask_class='model.FourierMask', mask_fourier_terms=3).mask_type() is model.FourierMask


@pytest.mark.parametrize('variant', MASK_VARIANTS)
def test_mask_is_computed_from_the_causal_attention(variant):
    ld = mask_module(variant).eval()
    x = torch.randn(2, 7, 16) * 5  # large z: every phase of a periodic mapping
    y, m, r = ld(x)
    if isinstance(ld, model.StaticMask):  # the controls without attention: one M per channel, for every token
        assert not hasattr(ld, 'c_attn') and torch.equal(m, ld.mask(torch.zeros_like(x)))
        assert torch.equal(m, m[:1, :1].expand_as(m))
    else:
        torch.testing.assert_close(m, ld.mask(reference_attention(ld.c_attn, x, 2)), rtol=1e-4, atol=1e-5)
        assert m.std() > 0.05
    assert torch.all((m >= 0) & (m <= 1))
    assert torch.equal(r, m if variant in SOFT else (m >= 0.5).float())  # eval rounding
    assert torch.equal(y, x * r)  # selection: no 1/keep rescaling


@pytest.mark.parametrize('variant', HARD)
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
def test_training_masks_exactly_binary(variant, dtype):
    ld = mask_module(variant, n_embd=64).train()
    x = torch.randn(4, 16, 64) * 3
    # the module cast to dtype ...
    y, m, r = ld.to(dtype)(x.to(dtype))
    assert set(torch.unique(r.float()).tolist()) == {0.0, 1.0}
    kept = y != 0
    assert torch.equal(y[kept], x.to(dtype)[kept])
    # ... and fp32 weights under autocast
    ld = ld.float()
    with torch.autocast('cpu', dtype=dtype, enabled=dtype != torch.float32):
        y, m, r = ld(x)
    assert set(torch.unique(r.float()).tolist()) == {0.0, 1.0}
    assert torch.all((y == 0) | (y == x.to(y.dtype)))


@pytest.mark.parametrize('stochastic_inference', [False, True])
@pytest.mark.parametrize('variant', MASK_VARIANTS)
def test_masks_follow_bernoulli_m(variant, stochastic_inference):
    """In training, and in eval with stochastic inference, each element is kept with probability M,
    independently: 4,000 draws of the same input match M within 5 standard errors."""
    ld = mask_module(variant).train(not stochastic_inference)
    ld.stochastic_inference = stochastic_inference
    x = torch.randn(1, 8, 16).expand(4000, 8, 16)  # same input: same M, independent noise
    torch.manual_seed(1)
    _, m, r = ld(x)
    m0 = m[0]
    assert torch.allclose(m, m0.expand_as(m))
    tol = 5 * torch.sqrt(m0 * (1 - m0) / 4000) + 1e-3
    assert torch.all((r.mean(0) - m0).abs() <= tol)
    assert ((m0 > 0.1) & (m0 < 0.9)).float().mean() > 0.3  # a real spread of probabilities was tested
    if variant not in SOFT:  # independent elements: two channels' draws are uncorrelated
        a, b = r[:, 0, 0] - m0[0, 0], r[:, 3, 5] - m0[3, 5]
        assert abs((a * b).mean()) < 5 * (m0[0, 0] * (1 - m0[0, 0]) * m0[3, 5] * (1 - m0[3, 5])).sqrt() / 4000 ** 0.5 + 1e-3


@pytest.mark.parametrize('variant', MASK_VARIANTS)
def test_gradient_passes_straight_through_to_m(variant):
    """d(sum g * x * R)/dM = g * x: dR/dM = 1, whatever the rounding."""
    ld = mask_module(variant).train()
    x, g = torch.randn(2, 6, 16), torch.randn(2, 6, 16)
    if not any(p.requires_grad for p in ld.parameters()):  # RandomMask: a fixed M, nothing to learn
        assert not ld(x)[1].requires_grad
        return
    ms = []
    orig = ld.mask
    ld.mask = lambda z: ms.append(orig(z)) or ms[-1].retain_grad() or ms[-1]
    y, m, _ = ld(x)
    (y * g).sum().backward()
    torch.testing.assert_close(ms[0].grad, g * x)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ld.parameters())


def test_static_and_random_controls():
    """StaticMask learns one keep probability per channel (its shift) and sees no input; RandomMask keeps a
    fixed share 0.5 cos(shift_init) + 0.5, learns nothing, and is not decayed or saved as a parameter."""
    static, rand = mask_module('static').train(), mask_module('random', shift_init=math.acos(2 * 0.3 - 1)).train()
    assert [n for n, _ in static.named_parameters()] == ['shift']
    assert list(rand.parameters()) == [] and 'shift' in dict(rand.named_buffers()) and 'shift' in rand.state_dict()
    x = torch.randn(4000, 2, 16)
    torch.manual_seed(0)
    y, m, r = rand(x)
    torch.testing.assert_close(m, torch.full_like(m, 0.3))
    assert abs(r.mean().item() - 0.3) < 0.01
    y, m, r = static(x)
    (y * torch.randn_like(y)).sum().backward()
    assert static.shift.grad.abs().min() > 0  # the per-channel keep probability learns


@pytest.mark.parametrize('variant', MASK_VARIANTS)
@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_every_mask_class_is_causal(variant, mode):
    assert_causal(tiny(shift_init=math.pi / 2, **MASK_VARIANTS[variant]), mode)


@pytest.mark.parametrize('variant', MASK_VARIANTS)
def test_every_mask_class_kv_cache_matches_full_recompute(variant):
    m = tiny(n_layer=3, n_embd=48, n_head=3, shift_init=0.5, **MASK_VARIANTS[variant])
    assert_kv_cache_matches_full_recompute(sharpen(m))


# ---------------------------------------------------------------------------- the GPT

@pytest.mark.parametrize('module,mode', [(model, 'eval'), (model, 'train'),
                                         (baseline_model, 'eval'), (baseline_model, 'train')])
def test_causality(module, mode):
    kw = dict(shift_init=math.pi / 2) if module is model else dict(dropout=0.3)
    assert_causal(tiny(module, **kw), mode)


def test_penalty_value_and_absence():
    m = tiny(shift_init=math.pi / 2, penalty_coeff=0.3)
    x = torch.randint(0, 97, (2, 16))
    y = torch.randint(0, 97, (2, 16))
    recorded = []  # each layer's M, seen by forward hooks: the block must call the module itself
    hooks = [b.learned_dropout.register_forward_hook(lambda mod, inp, out: recorded.append(out[1].detach()))
             for b in m.transformer.h]
    m.train()
    logits, loss, stats = m(x, y, return_stats=True)
    for h in hooks:
        h.remove()
    assert len(recorded) == 2
    ce = F.cross_entropy(logits.view(-1, 97), y.view(-1))
    penalty = sum((mm ** 2 / 2).mean() for mm in recorded) / len(recorded)
    torch.testing.assert_close(loss, ce + 0.3 * penalty)
    torch.testing.assert_close(stats['ce'], ce.detach())
    torch.testing.assert_close(stats['penalty'].mean(), penalty)
    # eval: pure cross-entropy
    m.eval()
    logits, loss = m(x, y)
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, 97), y.view(-1)))
    # penalty_coeff = 0: no penalty term in training either
    m0 = tiny(shift_init=math.pi / 2, penalty_coeff=0.0).train()
    logits, loss = m0(x, y)
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, 97), y.view(-1)))


def capture_block(block):
    """Forward hooks on a LearnedBlock's parts: their inputs and outputs of the next call."""
    seen = {}
    for name in ('attn', 'mlp', 'learned_dropout'):
        getattr(block, name).register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, (inp, out)))
    return seen


@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_block_masks_the_mlp_output_with_a_mask_of_itself(mode):
    """h = a + f * R with a = h + Attn(LN1(h)), f the MLP output, and M computed from f itself (not from
    LN2(a), the MLP's input): no rescaling, nothing else added."""
    m = tiny(shift_init=math.pi / 2, n_embd=32, n_head=2).train(mode == 'train')
    block = m.transformer.h[1]
    seen = capture_block(block)
    x = torch.randn(3, 16, 32)
    torch.manual_seed(0)
    out, M, R = block(x)
    attn_out = seen['attn'][1]
    f = seen['mlp'][1]
    assert seen['learned_dropout'][0][0] is f  # the module itself is called, on f
    ld = block.learned_dropout
    M_ref = 0.5 * torch.cos(reference_attention(ld.c_attn, f, ld.n_head) + ld.shift) + 0.5
    torch.testing.assert_close(M, M_ref, rtol=1e-5, atol=1e-6)
    assert set(torch.unique(R).tolist()) == {0.0, 1.0}
    if mode == 'eval':
        assert torch.equal(R, (M >= 0.5).float())
    torch.testing.assert_close(out, x + attn_out + f * R, rtol=0, atol=1e-6)


def test_penalty_gradient_reaches_the_mask():
    """The penalty term trains the masks: its gradient w.r.t. the shifts is that of
    penalty_coeff * mean over layers of mean(M^2/2), not zero (a detached M would log the same value)."""
    x = torch.randint(0, 97, (2, 16))
    grads = {}
    for coeff in (0.0, 0.5):
        m = tiny(shift_init=math.pi / 2, penalty_coeff=coeff).train()
        torch.manual_seed(0)
        _, loss = m(x, x)
        loss.backward()
        grads[coeff] = torch.stack([b.learned_dropout.shift.grad for b in m.transformer.h])
    m = tiny(shift_init=math.pi / 2, penalty_coeff=0.5).train()
    ms = []
    for b in m.transformer.h:
        b.learned_dropout.register_forward_hook(lambda mod, inp, out: ms.append(out[1]))
    torch.manual_seed(0)
    m(x, x)
    penalty = 0.5 * torch.stack([(mm ** 2 / 2).mean() for mm in ms]).mean()
    expected = torch.stack(torch.autograd.grad(penalty, [b.learned_dropout.shift for b in m.transformer.h]))
    assert expected.abs().max() > 1e-6
    torch.testing.assert_close(grads[0.5] - grads[0.0], expected, rtol=1e-3, atol=1e-7)


def test_stats_are_per_layer_and_consistent():
    m = tiny(shift_init=math.pi / 2).train()
    x = torch.randint(0, 97, (4, 16))
    _, _, s = m(x, x, return_stats=True)
    for k in model.MASK_STATS:
        assert s[k].shape == (2,) and not s[k].requires_grad
    assert torch.all((0 <= s['keep']) & (s['keep'] <= 1))
    assert torch.all(s['mask_gt_0.9'] + s['mask_lt_0.1'] <= 1)
    assert torch.all((s['keep'] - s['mask_mean']).abs() < 0.05)  # E[R] = M
    m.eval()
    _, _, s_eval = m(x, x, return_stats=True)
    _, _, s_eval2 = m(x, x, return_stats=True)
    assert torch.equal(s_eval['keep'], s_eval2['keep'])  # deterministic masks in eval


def test_shift_zero_keeps_everything_at_init_and_pi_drops_everything():
    x = torch.randint(0, 97, (2, 16))
    _, _, s0 = tiny(shift_init=0.0).train()(x, x, return_stats=True)
    _, _, spi = tiny(shift_init=math.pi).train()(x, x, return_stats=True)
    assert torch.all(s0['keep'] > 0.99)
    assert torch.all(spi['keep'] < 0.01)


# ---------------------------------------------------------------------------- baseline dropout

def test_baseline_eval_has_no_dropout():
    m4 = tiny(baseline_model, dropout=0.4)
    m0 = tiny(baseline_model, dropout=0.0)
    m0.load_state_dict(m4.state_dict())
    m4.eval(), m0.eval()
    x = torch.randint(0, 97, (3, 16))
    assert torch.equal(m4(x, x)[0], m0(x, x)[0])
    m4.train()
    assert not torch.equal(m4(x, x)[0], m0(x, x)[0])


KEEP_SCALE = {p: 65536 / (65536 - round(p * 65536)) for p in (0.2, 0.3, 0.4)}  # p rounded to 2^-16 on a CPU


@pytest.mark.parametrize('site', ['transformer.drop', 'attn.resid_dropout', 'mlp.dropout'])
def test_baseline_dropout_acts_at_every_site(site):
    """Each of nanoGPT's dropout sites (embedding sum, attention output, MLP output) drops a share p of
    its input in training and scales the rest by 1/(1-p); the hook fails if the site is not called."""
    m = tiny(baseline_model, dropout=0.3, n_embd=64, n_head=4).train()
    module = m.get_submodule(site if site.startswith('transformer') else f'transformer.h.0.{site}')
    seen = []
    module.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].detach(), out.detach())))
    m(torch.randint(0, 97, (8, 16)))
    assert seen, f'{site} was never called'
    x, y = seen[0]
    dropped = (y == 0) & (x != 0)
    assert abs(dropped.float().mean().item() - 0.3) < 0.03
    torch.testing.assert_close(y[~dropped], x[~dropped] * KEEP_SCALE[0.3])


def attention_probabilities(p, T=16, past=0, seed=0):
    """(the probabilities attend() used, after dropout, and before): one head whose values are the identity,
    so that row i of its output is row i of the (dropped, rescaled) attention probabilities."""
    g = torch.Generator().manual_seed(5)
    qk = torch.randn(1, past + T, 2 * (past + T), generator=g)
    v = torch.eye(past + T).unsqueeze(0)  # (1, Tk, Tk): value j is the unit vector e_j
    qkv = torch.cat([qk, v], -1)  # (1, Tk, 3 Tk); C = Tk, one head of Tk
    parts = iter([qkv[:, :past], qkv[:, past:]] if past else [qkv])
    c_attn = lambda z: next(parts)  # noqa: E731  (one object: the cache is keyed by it)
    cache = baseline_model.KVCache()
    if past:
        baseline_model.attend(c_attn, qkv[:, :past, :past + T], 1, cache)
    torch.manual_seed(seed)
    y = baseline_model.attend(c_attn, qkv[:, past:, :past + T], 1, cache if past else None, p)
    q, k = qk[0, past:, :past + T], qk[0, :, past + T:]
    scores = (q @ k.T) / math.sqrt(past + T)
    scores = scores.masked_fill(torch.ones(T, past + T, dtype=torch.bool).tril(past).logical_not(), float('-inf'))
    return y[0], scores.softmax(-1)


@pytest.mark.parametrize('T, past', [(16, 0), (13, 0), (5, 11)])
def test_attention_probability_dropout(T, past):
    """On a CPU, dropout on the attention probabilities (in 4 query blocks, with or without a past): each
    probability is kept with probability 1 - p and scaled by 1/(1 - p), causality holds, and with p rounding
    to 0 it is exactly the plain causal attention."""
    y, probs = attention_probabilities(1e-6, T, past)  # p rounds to 0: nothing dropped
    torch.testing.assert_close(y, probs, rtol=1e-5, atol=1e-6)
    kept = []
    for seed in range(200):
        y, probs = attention_probabilities(0.3, T, past, seed)
        assert torch.all(y[probs == 0] == 0)  # causal: no weight on a future key
        k = y[probs > 0] != 0
        torch.testing.assert_close(y[probs > 0][k], probs[probs > 0][k] * KEEP_SCALE[0.3])
        kept.append(k.float())
    rate = torch.cat(kept).mean().item()
    n = sum(len(k) for k in kept)
    assert abs(rate - 0.7) < 5 * (0.21 / n) ** 0.5


@pytest.mark.parametrize('T', [16, 13, 40])
def test_eager_dropout_attention_matches_blocked(T, monkeypatch):
    """Eager float32 training takes DropoutAttention (hand-written backward): from the same seed it draws the
    same masks as blocked_attention, the generic path that autograd differentiates, so outputs and the
    gradients of q, k and v agree; and attend() takes it for exactly that case."""
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(2, 3, T, 5, generator=g, requires_grad=True) for _ in range(3))
    dy = torch.randn(2, 3, T, 5, generator=g)
    out = []
    for f in (baseline_model.DropoutAttention.apply, baseline_model.blocked_attention):
        torch.manual_seed(1)
        y = f(q, k, v, 0.3)
        out.append((y, *torch.autograd.grad(y, (q, k, v), dy)))
    assert (out[0][0] == 0).any()  # something was dropped
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    calls, real = [], baseline_model.DropoutAttention.apply
    monkeypatch.setattr(baseline_model.DropoutAttention, 'apply', lambda *a: calls.append(1) or real(*a))
    lin = torch.nn.Linear(12, 36)
    baseline_model.attend(lin, torch.randn(2, T, 12), 3, dropout_p=0.2)
    assert calls == [1]
    with torch.autocast('cpu', dtype=torch.bfloat16):  # bf16: the generic path
        baseline_model.attend(lin, torch.randn(2, T, 12), 3, dropout_p=0.2)
    assert calls == [1]


@pytest.mark.parametrize('compiled', [False, pytest.param(True, marks=pytest.mark.slow)])
def test_cpu_dropout_is_independent_bernoulli(compiled):
    """The CPU dropout (eager: 16-bit lanes of 64-bit draws; compiled: a hashed counter) keeps each element
    with probability 1 - p and scales it by 1/(1 - p); elements are independent of their neighbours
    (lags 1 to 8, inside and across the 64-bit words) and between calls; a seed reproduces the masks."""
    f = torch.compile(baseline_model.dropout, dynamic=False) if compiled else baseline_model.dropout
    x = torch.rand(256, 1024) + 0.5
    torch.manual_seed(0)
    y1, y2 = f(x, 0.2), f(x, 0.2)
    torch.manual_seed(0)
    assert torch.equal(f(x, 0.2), y1)  # reproducible from the seed
    k1, k2 = (y1 != 0).float(), (y2 != 0).float()
    n = k1.numel()
    bound = 5 * (0.16 / n) ** 0.5  # five standard errors of a keep rate of 0.8
    assert abs(k1.mean().item() - 0.8) < bound and abs(k2.mean().item() - 0.8) < bound
    torch.testing.assert_close(y1[k1 > 0], x[k1 > 0] * KEEP_SCALE[0.2])
    assert abs(y1.mean().item() / x.mean().item() - 1) < 0.01  # inverted dropout keeps the expectation
    flat1, flat2 = k1.flatten() - 0.8, k2.flatten() - 0.8
    corr_bound = 5 / n ** 0.5  # five standard errors of a correlation of independent draws
    for lag in range(1, 9):
        assert abs((flat1[:-lag] * flat1[lag:]).mean().item() / 0.16) < corr_bound, lag
    assert abs((flat1 * flat2).mean().item() / 0.16) < corr_bound  # between calls (steps)


def test_baseline_attention_probability_dropout():
    """Dropout on the attention probabilities alone (embedding/residual sites switched off) still
    changes the training output, and never the eval output."""
    m = tiny(baseline_model, dropout=0.3).train()
    m.transformer.drop.p = 0.0
    for b in m.transformer.h:
        b.attn.resid_dropout.p = b.mlp.dropout.p = 0.0
    x = torch.randint(0, 97, (2, 16))
    torch.manual_seed(0)
    a, _ = m(x)
    torch.manual_seed(1)
    b, _ = m(x)
    assert not torch.allclose(a, b)
    m.eval()
    assert torch.equal(m(x)[0], m(x)[0])


def test_baseline_inverted_dropout_in_training():
    cfg = baseline_model.GPTConfig(n_embd=64, n_head=4, dropout=0.4)
    torch.manual_seed(0)
    mlp = baseline_model.MLP(cfg)
    x = torch.randn(64, 32, 64)
    ref = mlp.eval()(x)
    out = mlp.train()(x)
    dropped = out == 0
    assert abs(dropped.float().mean().item() - 0.4) < 0.01
    torch.testing.assert_close(out[~dropped], ref[~dropped] * KEEP_SCALE[0.4])  # kept values scaled by 1/(1-p)
    assert abs(out.mean().item() - ref.mean().item()) < 0.05 * ref.abs().mean().item()


# ---------------------------------------------------------------------------- generation

@pytest.mark.parametrize('module', [model, baseline_model])
def test_kv_cache_matches_full_recompute(module):
    out = assert_kv_cache_matches_full_recompute(sharpen(tiny(module, n_layer=3, n_embd=48, n_head=3)))
    assert len(set(out[0, 5:].tolist())) > 3


@pytest.mark.parametrize('T, past', [(12, 0), (1, 11), (5, 7)])
def test_cpu_low_precision_attention_matches_float32(T, past):
    """On a CPU, bf16 attention takes the explicit path (scores, float32 softmax, values): it computes
    what float32 scaled_dot_product_attention computes, with a past in a KV cache or without, and so
    do its gradients; heads of 13 as in the seed's baseline."""
    torch.manual_seed(0)
    c_attn = torch.nn.Linear(52, 3 * 52, bias=False)
    x = torch.randn(3, past + T, 52)

    def run(dtype):
        xs, w = x.clone().requires_grad_(True), c_attn.weight.detach().to(dtype).requires_grad_(True)
        lin = lambda z: z.to(dtype) @ w.t()  # noqa: E731
        cache = baseline_model.KVCache()
        if past:
            baseline_model.attend(lin, xs[:, :past], 4, cache)
        y = baseline_model.attend(lin, xs[:, past:], 4, cache if past else None)  # (3, T, 52)
        (y.float() * torch.linspace(-1, 1, 52)).sum().backward()
        return y.float(), xs.grad, w.grad.float()
    for ref, low in zip(run(torch.float32), run(torch.bfloat16)):
        torch.testing.assert_close(low, ref, rtol=0.05, atol=0.05 * ref.abs().max().item())
    # the explicit path is causal: a later token changes nothing before it
    lin = lambda z: z.to(torch.bfloat16) @ c_attn.weight.detach().to(torch.bfloat16).t()  # noqa: E731
    y1 = baseline_model.attend(lin, x[:, :8], 4)
    y2 = baseline_model.attend(lin, torch.cat([x[:, :7], -x[:, 7:8]], 1), 4)
    assert torch.equal(y1[:, :7], y2[:, :7]) and not torch.equal(y1[:, 7], y2[:, 7])


def test_generate_sampling_distribution():
    """top_k=1 is greedy decoding; top_k=k only ever emits one of the k most likely tokens; top_k=None
    samples the softmax of logits / temperature."""
    m = sharpen(tiny(n_embd=48, n_head=3)).eval()  # peaked, varied distributions
    idx = torch.randint(0, 97, (4, 3), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    assert torch.equal(m.generate(idx, 10, temperature=0.7, top_k=1), full_recompute_greedy(m, idx, 10))
    torch.manual_seed(1)
    out = m.generate(idx, 12, temperature=1.5, top_k=3)
    assert out.shape == (4, 15)
    for t in range(3, 15):
        logits, _ = m(out[:, :t])
        top3 = logits[:, -1].topk(3).indices
        assert (top3 == out[:, t:t + 1]).any(-1).all()
    # one step, many draws: empirical frequencies follow softmax(logits / T)
    x = idx[:1].expand(4000, 3)
    torch.manual_seed(2)
    draws = m.generate(x, 1, temperature=2.0)[:, -1]
    probs = F.softmax(m(idx[:1])[0][0, -1] / 2.0, -1)
    freq = torch.bincount(draws, minlength=97).float() / 4000
    assert (freq - probs).abs().max() < 0.03


# ---------------------------------------------------------------------------- training

@pytest.mark.parametrize('module', [model, baseline_model])
def test_tiny_model_overfits_one_batch(module):
    m = tiny(module, n_embd=64, n_head=4)
    opt = m.configure_optimizers(0.0, 3e-3, (0.9, 0.95), 'cpu')
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 97, (4, 16), generator=g)
    y = torch.randint(0, 97, (4, 16), generator=g)
    m.train()
    for _ in range(150):
        _, loss = m(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    assert m(x, y)[1].item() < 0.3


@pytest.mark.slow
def test_compile_fullgraph_forward_backward(monkeypatch):
    """torch.compile(fullgraph=True) computes what eager computes: the same sampled masks (same seed),
    loss, statistics and gradients, with no graph break. (Compiled code draws its own random numbers
    unless told to use eager's generator, as here.)"""
    import torch._inductor.config
    monkeypatch.setattr(torch._inductor.config, 'fallback_random', True)
    m = tiny(shift_init=math.pi / 2, n_layer=1).train()
    compiled = torch.compile(m, fullgraph=True)
    x = torch.randint(0, 97, (2, 16))
    torch.manual_seed(3)
    logits, loss, stats = compiled(x, x, return_stats=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    torch.manual_seed(3)
    ref_logits, ref_loss, ref_stats = m(x, x, return_stats=True)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(stats['keep'], ref_stats['keep'])  # the same masks were drawn
    for n, p in m.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- the models did not move

# the last commit before the mask classes and the settings registry (the v2 study's code): the default models
# must compute exactly what it computed
BEFORE_REDESIGN = 'b3e59f5b617ae4be254e9a3fe394e56f86e53318'
IDENTITY_DUMP = '''
import sys
import torch
torch.set_num_threads(1)
import baseline_model, model, moe_model
BASE = dict(block_size=16, vocab_size=97, n_layer=2, n_head=2, n_embd=32)
CASES = {'learned': (model, {}), 'learned_shift_pi2': (model, dict(shift_init=1.5707963267948966)),
         'learned_embedding': (model, dict(mask_input='embedding')),
         'learned_fourier': (model, dict(mask_fourier_terms=3, shift_init=1.0)),
         'learned_soft': (model, dict(mask_rounding='soft', shift_init=1.0)),
         'baseline': (baseline_model, {}), 'moe': (moe_model, dict(n_expert=4, expert_top_k=2))}
out = {}
for name, (module, kw) in CASES.items():
    torch.manual_seed(0)
    m = module.GPT(module.GPTConfig(**BASE, **kw))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 97, (4, 16), generator=g), torch.randint(0, 97, (4, 16), generator=g)
    rec = {'state': {k: v.clone() for k, v in m.state_dict().items()}}
    torch.manual_seed(2)
    _, loss = m.train()(x, y)  # sampled masks
    loss.backward()
    rec['loss'], rec['grads'] = loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}
    with torch.no_grad():
        rec['logits'], rec['eval_loss'] = m.eval()(x, y)
    out[name] = rec
torch.save(out, sys.argv[1])
'''


@pytest.mark.slow
def test_default_models_are_bit_identical_to_the_v2_code(tmp_path):
    """At the same seed, the learned model (and its variants), the baseline and the MoE have the same initial
    weights, training-mode loss with sampled masks, gradients and eval logits as the v2 study's code."""
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    old = tmp_path / 'old'
    old.mkdir()
    for name in ('model.py', 'baseline_model.py', 'moe_model.py'):
        r = subprocess.run(['git', '-C', here, 'show', f'{BEFORE_REDESIGN}:{name}'], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f'needs the git history with {BEFORE_REDESIGN[:7]} (a full clone)')
        (old / name).write_text(r.stdout)
    (tmp_path / 'dump.py').write_text(IDENTITY_DUMP)
    for where, out in ((old, 'old.pt'), (here, 'new.pt')):
        subprocess.run([sys.executable, str(tmp_path / 'dump.py'), str(tmp_path / out)], cwd=where, check=True,
                       env=dict(os.environ, PYTHONPATH=str(where)))
    a, b = torch.load(tmp_path / 'old.pt'), torch.load(tmp_path / 'new.pt')
    assert list(a) == list(b)
    for case in a:
        for part in ('state', 'grads'):
            assert list(a[case][part]) == list(b[case][part]), (case, part)
            assert all(torch.equal(a[case][part][k], b[case][part][k]) for k in a[case][part]), (case, part)
        for part in ('loss', 'logits', 'eval_loss'):
            assert torch.equal(a[case][part], b[case][part]), (case, part)
