"""The comparison variants, on CPU at tiny sizes: the mixture-of-experts baseline (moe_model.py)
and the learned model's mask_input, mask_fourier_terms and mask_rounding options (model.py)."""

import dataclasses
import math
import os
import runpy

import pytest
import torch
import torch.nn.functional as F

import baseline_model
import model
import moe_model
import runtime
from baseline_model import attend
from conftest import assert_causal, assert_kv_cache_matches_full_recompute, reference_attention, sharpen, tiny

HERE = os.path.dirname(os.path.abspath(__file__))
MOE = dict(n_expert=4, expert_top_k=2)
LEARNED_VARIANTS = {
    'embedding': dict(mask_input='embedding'),
    'embedding_detached': dict(mask_input='embedding', detach_mask_input=True),
    'fourier3': dict(mask_fourier_terms=3),
    'soft': dict(mask_rounding='soft'),
}


def seed_config(name):
    """(module, GPTConfig) of config/<name>.py at train.py's defaults (context 200, GPT-2 vocabulary)."""
    c = runpy.run_path(os.path.join(HERE, 'config', f'{name}.py'))
    module = runtime.model_module(c['model_type'])
    args = dict(block_size=200, vocab_size=50257)
    args.update({f.name: c[f.name] for f in dataclasses.fields(module.GPTConfig) if f.name in c})
    return module, module.GPTConfig(**args)


# ============================================================================ mixture of experts

@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_moe_causal(mode):
    assert_causal(tiny(moe_model, dropout=0.2, **MOE), mode)


def test_moe_routing_is_per_token():
    cfg = moe_model.GPTConfig(n_embd=32, n_head=2, **MOE)
    torch.manual_seed(0)
    mlp = sharpen(moe_model.MoEMLP(cfg), 30)
    x = torch.randn(2, 6, 32)
    y = mlp(x)[0]
    for t in range(6):  # each token alone: the same output as within the batch
        torch.testing.assert_close(mlp(x[:, t:t + 1])[0][:, 0], y[:, t], rtol=1e-4, atol=1e-5)
    _, _, _, load = mlp(x)
    assert (load > 0).sum() > 2  # the tokens really went to different experts


def test_moe_single_expert_is_the_dense_baseline():
    """n_expert=1, top-1, 4C hidden units: the baseline GPT exactly, dropout included."""
    dense = tiny(baseline_model, dropout=0.2)
    moe = tiny(moe_model, dropout=0.2, n_expert=1, expert_top_k=1, expert_hidden=4 * 32)
    sd = moe.state_dict()
    for k, v in dense.state_dict().items():
        if k.endswith('mlp.c_fc.weight'):
            sd[k] = v.unsqueeze(0)  # (1, 4C, C)
        elif k.endswith('mlp.c_proj.weight'):
            sd[k] = v.t().unsqueeze(0)  # (1, 4C, C): row j holds hidden unit j's output weights
        else:
            sd[k] = v
    moe.load_state_dict(sd)
    x = torch.randint(0, 97, (3, 16))
    for mode in (False, True):
        dense.train(mode), moe.train(mode)
        torch.manual_seed(1)
        logits_d, loss_d = dense(x, x)
        torch.manual_seed(1)
        logits_m, loss_m, stats = moe(x, x, return_stats=True)
        torch.testing.assert_close(logits_m, logits_d, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(stats['ce'], loss_d.detach(), rtol=1e-6, atol=1e-6)
        # one expert takes every token: the balancing loss is exactly 1, added (x 0.01) in training only
        assert torch.equal(stats['moe_aux'], torch.ones(2))
        torch.testing.assert_close(loss_m, loss_d + (0.01 if mode else 0.0), rtol=1e-6, atol=1e-6)


def test_moe_aux_loss_formula():
    cfg = moe_model.GPTConfig(n_embd=2, n_head=1, n_expert=2, expert_top_k=1, expert_hidden=4)
    mlp = moe_model.MoEMLP(cfg)
    with torch.no_grad():
        mlp.router.weight.copy_(torch.eye(2) * math.log(3))
    # tokens (1, 0) route with probabilities (3/4, 1/4), tokens (0, 1) with (1/4, 3/4)
    a, b = [1.0, 0.0], [0.0, 1.0]
    _, aux, z_loss, load = mlp(torch.tensor([[a, a, a, b]]))
    # f = (3/4, 1/4); P = ((3 * 3/4 + 1/4) / 4, (3 * 1/4 + 3/4) / 4) = (5/8, 3/8)
    torch.testing.assert_close(load, torch.tensor([0.75, 0.25]))
    torch.testing.assert_close(aux, torch.tensor(2 * (0.75 * 5 / 8 + 0.25 * 3 / 8)))  # 1.125
    torch.testing.assert_close(z_loss, torch.tensor(math.log(4) ** 2))  # logsumexp(log 3, 0) = log 4
    # perfectly balanced routing (f = P = 1/2 each) is the minimum, 1
    _, aux, _, load = mlp(torch.tensor([[a, b, a, b]]))
    torch.testing.assert_close(load, torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(aux, torch.tensor(1.0))
    # uniform router probabilities (P = 1/n_expert) give 1 whatever the loads
    cfg = moe_model.GPTConfig(n_embd=8, n_head=1, n_expert=4, expert_top_k=2)
    mlp = moe_model.MoEMLP(cfg)
    with torch.no_grad():
        mlp.router.weight.zero_()
    _, aux, _, load = mlp(torch.randn(2, 5, 8))
    torch.testing.assert_close(aux, torch.tensor(1.0))
    assert load.sum().item() == pytest.approx(1.0)


def test_moe_loss_terms_in_training_only():
    m = tiny(moe_model, moe_aux_coeff=0.05, router_z_coeff=0.1, **MOE)
    x = torch.randint(0, 97, (2, 16))
    y = torch.randint(0, 97, (2, 16))
    m.train()
    logits, loss, stats = m(x, y, return_stats=True)
    _, aux, z_loss, _ = m.hidden(x)
    ce = F.cross_entropy(logits.view(-1, 97), y.view(-1))
    torch.testing.assert_close(loss, ce + 0.05 * aux.mean() + 0.1 * z_loss.mean())
    torch.testing.assert_close(stats['moe_aux'], aux.detach())
    m.eval()
    logits, loss = m(x, y)
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, 97), y.view(-1)))


@pytest.mark.parametrize('aux_coeff', [0.0, 0.01])
def test_moe_router_gets_gradients(aux_coeff):
    m = tiny(moe_model, moe_aux_coeff=aux_coeff, **MOE).train()
    x = torch.randint(0, 97, (2, 16))
    m(x, x)[1].backward()
    for block in m.transformer.h:  # through the gates alone (aux_coeff 0) and through the balancing loss
        assert block.mlp.router.weight.grad is not None and block.mlp.router.weight.grad.abs().sum() > 0
        assert block.mlp.c_fc.weight.grad.abs().sum() > 0


def test_moe_stats():
    m = tiny(moe_model, **MOE).train()
    x = torch.randint(0, 97, (4, 16))
    _, _, s = m(x, x, return_stats=True)
    assert set(s) == {'ce', 'moe_aux', 'load_entropy', 'expert_load'}
    assert s['moe_aux'].shape == (2,) and s['load_entropy'].shape == (2,) and s['expert_load'].shape == (2, 4)
    assert not any(v.requires_grad for v in s.values())
    torch.testing.assert_close(s['expert_load'].sum(-1), torch.ones(2))
    f = s['expert_load']
    torch.testing.assert_close(s['load_entropy'], -(f * f.clamp_min(1e-30).log()).sum(-1))
    assert torch.all((0 <= s['load_entropy']) & (s['load_entropy'] <= math.log(4) + 1e-6))
    m.eval()
    _, _, s = m(x, return_stats=True)  # no targets: no 'ce'
    assert 'ce' not in s and s['moe_aux'].shape == (2,)


def test_moe_init_sizes_and_optimizer():
    m = tiny(moe_model, n_layer=4, n_embd=64, n_head=4, **MOE)
    mlp = m.transformer.h[0].mlp
    assert mlp.c_fc.weight.shape == (4, 64, 64) and mlp.c_proj.weight.shape == (4, 64, 64)  # 4C split over 4
    assert mlp.router.weight.shape == (4, 64) and mlp.router.bias is None
    assert mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert mlp.router.weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert mlp.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.05)
    assert m.lm_head.weight is m.transformer.wte.weight
    opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    decayed = {id(p) for p in opt.param_groups[0]['params']}
    assert {id(mlp.c_fc.weight), id(mlp.c_proj.weight), id(mlp.router.weight)} <= decayed
    assert sum(p.numel() for g in opt.param_groups for p in g['params']) == sum(p.numel() for p in m.parameters())


def test_moe_active_params_and_flops():
    m = tiny(moe_model, n_expert=8, expert_top_k=3)  # C 32: experts of 16 hidden units
    per_expert = 2 * 16 * 32
    assert m.get_num_active_params() == m.get_num_params() - 2 * 5 * per_expert
    assert m.flops_per_token() == 6 * m.get_num_active_params() + 12 * 2 * 16 * 32
    every = tiny(moe_model, n_expert=4, expert_top_k=4)
    assert every.get_num_active_params() == every.get_num_params()


def test_moe_kv_cache_matches_full_recompute():
    assert_kv_cache_matches_full_recompute(sharpen(tiny(moe_model, n_layer=3, n_embd=48, n_head=3, **MOE)))


@pytest.mark.slow
def test_moe_compile_fullgraph_forward_backward():
    m = tiny(moe_model, n_layer=1, **MOE).train()
    compiled = torch.compile(m, fullgraph=True)
    x = torch.randint(0, 97, (2, 16))
    logits, loss, stats = compiled(x, x, return_stats=True)
    loss.backward()
    _, ref_loss = m(x, x)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-4)
    assert all(p.grad is not None for p in m.parameters())
    assert stats['expert_load'].shape == (1, 4)


@pytest.mark.parametrize('module,model_type,kw', [
    (moe_model, 'moe', MOE),
    (model, 'learned', dict(mask_input='embedding', mask_fourier_terms=2)),
])
def test_runtime_loads_variant_checkpoints(tmp_path, module, model_type, kw):
    m = tiny(module, **kw)
    args = dataclasses.asdict(m.config)
    torch.save({'model': m.state_dict(), 'model_type': model_type, 'model_args': args}, tmp_path / 'ckpt.pt')
    loaded, _ = runtime.load_model(str(tmp_path / 'ckpt.pt'))
    assert type(loaded) is module.GPT and not loaded.training
    x = torch.randint(0, 97, (2, 16))
    assert torch.equal(loaded(x, x)[0], m.eval()(x, x)[0])


# ============================================================================ learned variants

def test_default_options_are_todays_model():
    a = tiny(model)
    b = tiny(model, mask_input='mlp_output', detach_mask_input=False, mask_fourier_terms=1,
             mask_rounding='stochastic')
    per_block = ['ln_1.weight', 'attn.c_attn.weight', 'attn.c_proj.weight', 'ln_2.weight', 'mlp.c_fc.weight',
                 'mlp.c_proj.weight', 'learned_dropout.shift', 'learned_dropout.c_attn.weight']
    keys = ['transformer.wte.weight', 'transformer.wpe.weight'] + [
        f'transformer.h.{i}.{k}' for i in range(2) for k in per_block] + ['transformer.ln_f.weight', 'lm_head.weight']
    assert list(a.state_dict()) == keys == list(b.state_dict())
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    # M is the method's single shifted cosine, bit for bit
    ld = a.transformer.h[0].learned_dropout.eval()
    f = torch.randn(2, 16, 32)
    _, m, r = ld(f)
    assert torch.equal(m, 0.5 * torch.cos(attend(ld.c_attn, f, 2) + ld.shift) + 0.5)
    assert torch.equal(r, (m >= 0.5).float())
    x = torch.randint(0, 97, (2, 16))
    for mode in (True, False):
        a.train(mode), b.train(mode)
        torch.manual_seed(3)
        la, _ = a(x, x)
        torch.manual_seed(3)
        lb, _ = b(x, x)
        assert torch.equal(la, lb)


@pytest.mark.parametrize('variant', list(LEARNED_VARIANTS))
def test_learned_variant_stats(variant):
    m = tiny(model, shift_init=math.pi / 2, **LEARNED_VARIANTS[variant])
    x = torch.randint(0, 97, (4, 16))
    for mode in (True, False):
        m.train(mode)
        _, loss, s = m(x, x, return_stats=True)
        assert set(s) == {'ce', *model.MASK_STATS}
        for k in model.MASK_STATS:
            assert s[k].shape == (2,) and not s[k].requires_grad
        assert torch.all((0 <= s['keep']) & (s['keep'] <= 1))
        assert torch.isfinite(loss)


@pytest.mark.parametrize('variant', ['embedding', 'fourier3', 'soft'])
@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_learned_variant_causal(variant, mode):
    assert_causal(tiny(model, shift_init=math.pi / 2, **LEARNED_VARIANTS[variant]), mode)


@pytest.mark.parametrize('variant', ['embedding', 'fourier3', 'soft'])
def test_learned_variant_kv_cache_matches_full_recompute(variant):
    m = tiny(model, n_layer=3, n_embd=48, n_head=3, shift_init=math.pi / 2, **LEARNED_VARIANTS[variant])
    assert_kv_cache_matches_full_recompute(sharpen(m))


# ---------------------------------------------------------------------------- mask_input='embedding'

def test_embedding_masks_add_one_attention_and_keep_the_other_weights():
    base = tiny(model)
    m = tiny(model, mask_input='embedding')
    extra = {k: v for k, v in m.state_dict().items() if k not in base.state_dict()}
    assert set(extra) == {'transformer.mask_attn.c_attn.weight', 'transformer.mask_attn.c_proj.weight'}
    assert extra['transformer.mask_attn.c_attn.weight'].shape == (96, 32)
    assert extra['transformer.mask_attn.c_proj.weight'].shape == (32, 32)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in base.state_dict().items())
    assert m.get_num_params() == base.get_num_params() + 4 * 32 * 32
    assert m.flops_per_token() == base.flops_per_token() + 6 * 4 * 32 * 32 + 12 * 16 * 32


def test_embedding_mask_depends_on_the_embedding_path_not_f():
    x = torch.randint(0, 97, (2, 16))
    for mask_input in ('embedding', 'mlp_output'):
        m = tiny(model, mask_input=mask_input, shift_init=math.pi / 2).eval()
        out, ms, _ = m.hidden(x)
        with torch.no_grad():  # another MLP: another f in every layer
            for block in m.transformer.h:
                block.mlp.c_fc.weight.mul_(3)
        out2, ms2, _ = m.hidden(x)
        assert not torch.allclose(out, out2)
        same = all(torch.equal(a, b) for a, b in zip(ms, ms2))
        assert same == (mask_input == 'embedding')
    # the shared input is the mask attention of the embeddings: the mask is that layer's formula of it
    m = tiny(model, mask_input='embedding', shift_init=1.0).eval()
    _, ms, _ = m.hidden(x)
    e = m.embed(x)
    source = m.transformer.mask_attn.c_proj(reference_attention(m.transformer.mask_attn.c_attn, e, 2))
    ld = m.transformer.h[1].learned_dropout
    m_ref = 0.5 * torch.cos(reference_attention(ld.c_attn, source, 2) + ld.shift) + 0.5
    torch.testing.assert_close(ms[1], m_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('detach', [True, False])
def test_detach_mask_input(detach):
    m = tiny(model, mask_input='embedding', detach_mask_input=detach, shift_init=math.pi / 2).train()
    x = torch.randint(0, 97, (2, 16))
    m(x, x)[1].backward()
    for p in m.transformer.mask_attn.parameters():
        assert (p.grad is None) == detach
        assert detach or p.grad.abs().sum() > 0
    for block in m.transformer.h:  # each layer's own mask attention trains either way
        assert block.learned_dropout.c_attn.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------- mask_fourier_terms

def test_fourier_parameters_and_init():
    m1 = tiny(model, shift_init=1.0)
    m3 = tiny(model, shift_init=1.0, mask_fourier_terms=3)
    sd1, sd3 = m1.state_dict(), m3.state_dict()
    for k, v in sd1.items():  # everything but the phases: the same values at the same seed
        if not k.endswith('shift'):
            assert torch.equal(v, sd3[k])
    ld = m3.transformer.h[0].learned_dropout
    assert ld.shift.shape == (3 * 32,) and torch.all(ld.shift == 1.0)  # every b_k starts at shift_init
    assert torch.equal(ld.fourier_logits.detach(), torch.zeros(3))  # uniform weights
    assert not hasattr(m1.transformer.h[0].learned_dropout, 'fourier_logits')
    assert type(m3.transformer.h[0].learned_dropout) is model.FourierMask
    opt = m3.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    plain = {id(p) for p in opt.param_groups[1]['params']}
    assert opt.param_groups[1]['weight_decay'] == 0.0
    assert all({id(b.learned_dropout.shift), id(b.learned_dropout.fourier_logits)} <= plain for b in m3.transformer.h)


def test_fourier_formula_range_and_gradients():
    cfg = model.GPTConfig(n_embd=12, n_head=3, mask_fourier_terms=3)
    torch.manual_seed(0)
    ld = model.FourierMask(cfg).train()
    with torch.no_grad():
        ld.fourier_logits.copy_(torch.randn(3))
        ld.shift.uniform_(0, 2 * math.pi)
    x = torch.randn(2, 7, 12) * 10  # large z: every phase of every term
    g = torch.randn(2, 7, 12)
    y, m, r = ld(x)
    z = reference_attention(ld.c_attn, x, 3)
    w = ld.fourier_logits.softmax(0)
    m_ref = 0.5 + 0.5 * sum(w[k - 1] * torch.cos(k * z + ld.shift.view(3, 12)[k - 1]) for k in (1, 2, 3))
    torch.testing.assert_close(m, m_ref, rtol=1e-5, atol=1e-5)
    assert torch.all((m >= 0) & (m <= 1))
    assert m.min() < 0.2 and m.max() > 0.8
    assert set(torch.unique(r).tolist()) == {0.0, 1.0}
    (y * g).sum().backward()
    assert ld.fourier_logits.grad.abs().min() > 0
    assert torch.all(ld.shift.grad.view(3, 12).abs().sum(1) > 0)  # every term's phases


# ---------------------------------------------------------------------------- mask_rounding='soft'

def test_soft_masks_output_x_times_m():
    cfg = model.GPTConfig(n_embd=12, n_head=3, shift_init=0.7, mask_rounding='soft')
    torch.manual_seed(0)
    ld = model.SoftMask(cfg)
    x = torch.randn(2, 6, 12, requires_grad=True)
    g = torch.randn(2, 6, 12)
    for mode in (True, False):
        ld.train(mode)
        y, m, r = ld(x)
        assert torch.equal(y, x * m) and torch.equal(r, m)
        assert ((m > 0.01) & (m < 0.99)).float().mean() > 0.5  # really soft
    # the ordinary gradient of x * M, with no straight-through estimator
    (y * g).sum().backward()
    ours = [t.grad.clone() for t in (x, ld.shift, ld.c_attn.weight)]
    for t in (x, ld.shift, ld.c_attn.weight):
        t.grad = None
    m_ref = 0.5 * torch.cos(reference_attention(ld.c_attn, x, 3) + ld.shift) + 0.5
    (x * m_ref * g).sum().backward()
    for a, t in zip(ours, (x, ld.shift, ld.c_attn.weight)):
        torch.testing.assert_close(a, t.grad, rtol=1e-5, atol=1e-6)


# ============================================================================ validation, configs

@pytest.mark.parametrize('module,kw,match', [
    (model, dict(mask_input='attention'), 'mask_input'),
    (model, dict(detach_mask_input=True), 'detach_mask_input'),
    (model, dict(mask_fourier_terms=0), 'mask_fourier_terms'),
    (model, dict(mask_rounding='hard'), 'mask_rounding'),
    (moe_model, dict(n_expert=0), 'n_expert'),
    (moe_model, dict(n_expert=4, expert_top_k=5), 'expert_top_k'),
    (moe_model, dict(expert_top_k=0), 'expert_top_k'),
    (moe_model, dict(expert_hidden=-1), 'expert_hidden'),
    (moe_model, dict(n_embd=4, n_head=1, n_expert=32, expert_top_k=1), 'set expert_hidden'),
    (moe_model, dict(moe_aux_coeff=-0.1), 'moe_aux_coeff'),
    (moe_model, dict(router_z_coeff=-1.0), 'router_z_coeff'),
    (moe_model, dict(bias=True), 'bias'),
])
def test_invalid_options_rejected(module, kw, match):
    with pytest.raises(ValueError, match=match):
        module.GPTConfig(**kw)


# total parameters, active parameters and training FLOPs per token at the seed shapes: the numbers
# written in the config files' comments
SEED_SIZES = {
    'baseline': (15_441_192, 15_441_192, 102_381_552),
    'learned_shift0': (15_335_424, 15_335_424, 109_983_744),
    'moe_params': (15_473_640, 13_575_432, 91_186_992),
    'moe_flops': (30_643_080, 15_457_416, 102_478_896),
    'learned_precomputed': (15_418_368, 15_418_368, 110_827_008),
    'learned_fourier': (15_342_990, 15_342_990, 110_029_140),
    'learned_soft': (15_335_424, 15_335_424, 109_983_744),
    'baseline_narrow': (13_714_272, 13_714_272, 91_271_232),
    'baseline_dropout0.1': (15_441_192, 15_441_192, 102_381_552),
    'learned_static': (13_718_016, 13_718_016, 91_293_696),  # no mask attention: one attention per block
    'learned_random': (13_714_272, 13_714_272, 91_271_232),  # the width control's size: its fixed M is no parameter
}


@pytest.mark.parametrize('name', list(SEED_SIZES))
def test_seed_config_sizes(name):
    module, cfg = seed_config(name)
    with torch.device('meta'):  # sizes only: no memory, no init work
        m = module.GPT(cfg)
    active = m.get_num_active_params() if module is moe_model else m.get_num_params()
    assert (m.get_num_params(), active, m.flops_per_token()) == SEED_SIZES[name]
