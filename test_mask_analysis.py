"""mask_analysis.py: the variance split, keep rates, mutual information and functional test against
hand computations on tiny models whose masks are known to depend on the input or not; the command
line on a trained run (and a one-line refusal of a baseline run)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import mask_analysis
from conftest import sharpen, tiny
from runtime import val_halves

HERE = os.path.dirname(os.path.abspath(__file__))


def windows(n=3, B=4, T=16, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (B, T), generator=g), torch.randint(0, vocab, (B, T), generator=g))
            for _ in range(n)]


def recorded_masks(model, batches):
    """Each layer's M over every position, (n_layer, N, C), by a plain forward hook."""
    ms = {i: [] for i in range(model.config.n_layer)}
    hooks = [b.learned_dropout.register_forward_hook(lambda mod, inp, out, i=i: ms[i].append(out[1].reshape(-1, out[1].size(-1))))
             for i, b in enumerate(model.transformer.h)]
    with torch.no_grad():
        for x, y in batches:
            model(x, y)
    for h in hooks:
        h.remove()
    return torch.stack([torch.cat(ms[i]) for i in ms]).double()


def test_mutual_information_of_known_tables():
    counts = torch.zeros(1, 2, 1, 2, 2, dtype=torch.float64)  # (layer, ids, C, K, R)
    counts[0, 0, 0] = torch.tensor([[50., 0.], [0., 50.]])  # R is the id: 1 bit
    counts[0, 1, 0] = torch.tensor([[25., 25.], [25., 25.]])  # independent: 0 bits
    mi = mask_analysis.mutual_information(counts)
    assert mi[0, 0].item() == pytest.approx(1.0) and mi[0, 1].item() == pytest.approx(0.0, abs=1e-12)


def test_input_dependent_masks_against_hand_computation():
    torch.manual_seed(0)
    m = sharpen(tiny(shift_init=math.pi / 2), 4).eval()
    batches = windows()
    r = mask_analysis.analyse(m, batches, 2, 97)
    M = recorded_masks(m, batches)  # (layer, N, C)
    for i, layer in enumerate(r['layers']):
        within = M[i].var(0, unbiased=False).mean()
        between = M[i].mean(0).var(unbiased=False)
        assert layer['within_share'] == pytest.approx((within / (within + between)).item(), rel=1e-6)
        assert layer['within_share'] + layer['between_share'] == pytest.approx(1.0)
        rates = (M[i] >= 0.5).double().mean(0)
        assert layer['keep'] == pytest.approx(rates.mean().item(), rel=1e-9)
        assert layer['constant_share'] == pytest.approx(((rates == 0) | (rates == 1)).double().mean().item())
    assert r['layers'][0]['within_share'] > 0.1  # these masks do vary with the input ...
    assert r['layers'][0]['mi_bits'] > r['layers'][0]['mi_null_bits']  # ... and carry information about the token
    # the masks as they are: the model's own eval cross-entropy
    with torch.no_grad():
        ce = sum(m(x, y)[1].item() for x, y in batches) / len(batches)
    assert r['ce'] == pytest.approx(ce, rel=1e-6)
    assert {'ce_majority', 'ce_mean'} <= set(r) and r['ce_sampled'] is not None and r['soft_masks'] is False


def test_majority_masks_replace_every_token_mask():
    """ce_majority is the cross-entropy with R fixed per channel to its majority value: checked against the
    same model with each layer's round() returning that pattern."""
    torch.manual_seed(0)
    m = sharpen(tiny(shift_init=math.pi / 2), 4).eval()
    batches = windows()
    r = mask_analysis.analyse(m, batches, 2, 97)
    M = recorded_masks(m, batches)
    for i, block in enumerate(m.transformer.h):
        pattern = ((M[i] >= 0.5).double().mean(0) >= 0.5).float()
        block.learned_dropout.round = lambda mm, p=pattern: p.expand_as(mm)
    with torch.no_grad():
        ce = sum(m(x, y)[1].item() for x, y in batches) / len(batches)
    assert r['ce_majority'] == pytest.approx(ce, rel=1e-6)


def test_a_static_mask_is_all_between_channels():
    """StaticMask sees no input: no variance within channels, no information about the token, constant
    channels only, and the majority pattern is exactly its own eval mask."""
    m = tiny(shift_init=1.0, mask_class='model.StaticMask').eval()
    with torch.no_grad():  # channels on both sides of 0.5
        for b in m.transformer.h:
            b.learned_dropout.shift.copy_(torch.linspace(0, math.pi, 32))
    r = mask_analysis.analyse(m, windows(), 2, 97)
    for layer in r['layers']:
        assert layer['within_share'] == pytest.approx(0.0, abs=1e-9) and layer['constant_share'] == 1.0
        assert layer['mi_bits'] == pytest.approx(0.0, abs=1e-12)
        assert 0 < layer['keep'] < 1
    assert r['ce_majority'] == pytest.approx(r['ce'], rel=1e-7)


def test_a_mask_that_never_varies_has_no_variance_shares():
    """var(M) = 0 (one keep probability for every channel and token): the within/between shares are 0 / 0,
    reported as None rather than whatever the rounding of E[M^2] - E[M]^2 leaves."""
    m = tiny(shift_init=1.0, mask_class='model.StaticMask').eval()
    r = mask_analysis.analyse(m, windows(), 2, 97)
    for layer in r['layers']:
        assert layer['m_var'] < 1e-12 and layer['within_share'] is None and layer['between_share'] is None
        assert layer['keep'] == 1.0 and layer['constant_share'] == 1.0  # M = 0.77 everywhere: always kept


def test_soft_masks_are_read_as_m_at_least_half():
    """SoftMask applies R = M: the keep rates and mutual information read the mask as [M >= 0.5], the
    mean test fixes each channel at its mean M, and there is no sampled test."""
    torch.manual_seed(0)
    m = sharpen(tiny(shift_init=math.pi / 2, mask_class='model.SoftMask'), 4).eval()
    batches = windows()
    r = mask_analysis.analyse(m, batches, 2, 97)
    M = recorded_masks(m, batches)
    assert r['soft_masks'] is True and r['ce_sampled'] is None
    for i, layer in enumerate(r['layers']):
        rates = (M[i] >= 0.5).double().mean(0)
        assert layer['keep'] == pytest.approx(rates.mean().item(), rel=1e-9)
        assert layer['constant_share'] == pytest.approx(((rates == 0) | (rates == 1)).double().mean().item())
        assert 0 < layer['keep'] < 1
    assert r['layers'][0]['mi_bits'] > r['layers'][0]['mi_null_bits']
    for i, block in enumerate(m.transformer.h):  # R fixed per channel at its mean M
        block.learned_dropout.round = lambda mm, p=M[i].mean(0).float(): p.expand_as(mm)
    with torch.no_grad():
        ce = sum(m(x, y)[1].item() for x, y in batches) / len(batches)
    assert r['ce_mean'] == pytest.approx(ce, rel=1e-6)



@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_on_a_gpu_as_on_the_cpu():
    """The statistics accumulate on the CPU whatever device the model runs on: the same report on CUDA."""
    torch.manual_seed(0)
    m = sharpen(tiny(shift_init=math.pi / 2), 4).eval()
    batches = windows()
    cpu = mask_analysis.analyse(m, batches, 2, 97)
    gpu = mask_analysis.analyse(m.cuda(), [(x.cuda(), y.cuda()) for x, y in batches], 2, 97)
    for a, b in zip(cpu['layers'], gpu['layers']):
        assert b['keep'] == pytest.approx(a['keep'], abs=0.01)  # a channel at M = 0.5 may round either way
        assert b['within_share'] == pytest.approx(a['within_share'], abs=1e-4)
    assert gpu['ce_majority'] == pytest.approx(cpu['ce_majority'], rel=1e-4)


@pytest.mark.slow
def test_command_line_on_a_run(data_dir, tmp_path, monkeypatch):
    run = tmp_path / 'run'
    subprocess.run([sys.executable, os.path.join(HERE, 'train.py'), '--dataset=wiki_sample', f'--data_dir={data_dir}',
                    f'--out_dir={run}', '--n_layer=2', '--n_embd=32', '--n_head=2', '--block_size=32', '--batch_size=4',
                    '--gradient_accumulation_steps=1', '--max_iters=4', '--eval_interval=4', '--eval_iters=1',
                    '--warmup_iters=1', '--shift_init=1.5', '--compile=False'], check=True, capture_output=True)
    r = subprocess.run([sys.executable, os.path.join(HERE, 'mask_analysis.py'), f'--out_dir={run}', '--max_windows=20',
                        '--draws=2'], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    report = json.load(open(run / 'mask_analysis_ckpt_val.json'))
    assert len(report['layers']) == 2 and report['mask_class'] == 'LearnedDropout' and report['tokens'] == 20 * 32
    assert f"{report['ce']:.4f}" in r.stdout
    # a half of val's documents, as train.py's eval_halves deals them: the windows are that half's
    half = val_halves(os.path.join(data_dir, 'wiki_sample', 'val.bin'), 50256, 32)['val_test']
    seen, every_window = [], mask_analysis.every_window
    monkeypatch.setattr(mask_analysis, 'every_window', lambda data, *a: seen.append(data) or every_window(data, *a))
    mask_analysis.main([f'--out_dir={run}', '--split=val_test', '--draws=1', '--max_windows=10'])
    assert len(seen) == 1 and (seen[0] == half).all()
    report = json.load(open(run / 'mask_analysis_ckpt_val_test.json'))
    assert report['tokens'] == 10 * 32 and report['split'] == 'val_test'
    baseline = tmp_path / 'base'
    subprocess.run([sys.executable, os.path.join(HERE, 'train.py'), '--model_type=baseline', '--dataset=wiki_sample',
                    f'--data_dir={data_dir}', f'--out_dir={baseline}', '--n_layer=1', '--n_embd=16', '--n_head=1',
                    '--block_size=16', '--batch_size=2', '--gradient_accumulation_steps=1', '--max_iters=1', '--warmup_iters=1',
                    '--eval_interval=1', '--eval_iters=1', '--compile=False'], check=True, capture_output=True)
    r = subprocess.run([sys.executable, os.path.join(HERE, 'mask_analysis.py'), f'--out_dir={baseline}'],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and 'needs a learned model' in r.stderr and len(r.stderr.strip().splitlines()) == 1
