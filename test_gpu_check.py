"""gpu_check.py: its dry run on a CPU end to end (every phase in the report, the checks computed from real
numbers), its one-line refusal without a GPU, and the pieces that only a GPU would exercise (bench.py's compiled
table, the datasheet peaks, the report's pass/fail of the goals) on recorded figures."""

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import gpu_check
from runtime import check_data

HERE = os.path.dirname(os.path.abspath(__file__))


def run_check(*argv, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, os.path.join(HERE, 'gpu_check.py'), *argv], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=HERE)


@pytest.fixture(scope='module')
def dry_report(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp('gpu_check') / 'r.md'
    r = run_check('--dry_run=True', f'--out={out}', f'--data_dir={data_dir}')
    assert r.returncode == 0, r.stderr
    return out.read_text()


def summary(report):
    """{check: (result, measured)} from the report's summary table."""
    table = report.split('## Summary')[1].split('\n## ')[0]
    rows = [line.strip('|').split('|') for line in table.splitlines() if line.startswith('| ') and '---' not in line]
    return {c.strip(): (res.strip(), m.strip()) for c, res, m in rows[1:]}


@pytest.mark.slow
def test_dry_run_reports_every_phase(dry_report):
    report = dry_report
    assert '**Dry run**' in report
    for section in ('## Summary', '## Phases', '## bench.py', '## Training', '## Host syncs', '## Compile modes',
                    '## Projected full seed run'):
        assert section in report
    phases = re.findall(r'^\| (data|bench|bench variants|train \w+|torchrun \w+|sync \w+|mode \w+) \| ok \|', report, re.M)
    assert set(phases) == {'data', 'bench', 'bench variants', 'train learned', 'train baseline', 'torchrun learned',
                           'torchrun baseline', 'sync learned', 'sync baseline', 'mode eager'}
    assert 'FAILED' not in report
    # bench.py's table: the learned model, the baseline and every variant, each with its ratio to the baseline
    for name in ['learned', 'baseline'] + gpu_check.variants.split(','):
        assert re.search(rf'^\| {name} \| [\d.]+ \| [\d,]+ \| - \| [\d.]+x \|', report, re.M), name


@pytest.mark.slow
def test_dry_run_checks_come_from_real_numbers(dry_report):
    report = dry_report
    s = summary(report)
    for run in ('train learned', 'train baseline', 'torchrun learned', 'torchrun baseline'):
        result, measured = s[f'{run}: loss falls']
        first, last = map(float, measured.removeprefix('val ').split(' -> '))  # the final evaluation was reached
        assert 10 < first < 11.5 and last < 0.99 * first and result == 'PASS'  # from ln(50257) = 10.8, down
        # dynamo really compiled: the first step's eval-to-train recompile is seen, and none after it
        result, measured = s[f'{run}: no recompile after the first step']
        assert result == 'PASS' and re.fullmatch(r'0 after, [1-9]\d* in all', measured)
        row = re.search(rf'^\| {run} \| (\d+)/(\d+) \|', report, re.M)
        assert row and row[1] == row[2]
    for model in ('learned', 'baseline'):
        assert s[f'{model}: no host sync in one profiled step'] == ('PASS', 'none')
    # the goals are computed but not judged on a CPU
    hours = s['projected seed run < 1 h']
    assert hours[0] == 'n/a (dry run)' and float(hours[1].split()[0]) > 0
    assert re.search(r'\*\*[\d.]+ h\*\* \(goal < 1 h on one H100-class GPU\); from train.py\'s step time', report)
    ratio = s['learned/baseline <= 1.10x, bench.py']
    assert ratio[0] == 'n/a (dry run)' and 0.5 < float(ratio[1].split()[0]) < 2
    assert re.search(r'^\| eager \| [\d.]+ \| [\d.]+ \| [\d,]+ \| - \| [\d.]+x speed \|', report, re.M)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason='a CUDA GPU is here')
def test_no_gpu_is_one_line(tmp_path):
    r = run_check(f'--out={tmp_path / "r.md"}', timeout=60)
    assert r.returncode != 0
    assert r.stderr.strip() == "gpu_check.py: error: no CUDA GPU: run with --dry_run=True to check the script on a CPU"
    assert not (tmp_path / 'r.md').exists()


@pytest.mark.slow
def test_bad_option_is_one_line(tmp_path):
    r = run_check('--dry_run=True', '--compile_modes=fast', timeout=60)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith('gpu_check.py: error: compile_modes')


@pytest.mark.slow
def test_probe_finds_a_host_sync():
    """The sync check is not vacuous: a model that reads a tensor in its forward is caught."""
    code = ("import gpu_check, model\nf = model.GPT.forward\n"
            "def forward(self, idx, *a, **k):\n    idx.sum().item()\n    return f(self, idx, *a, **k)\n"
            "model.GPT.forward = forward\n"
            "gpu_check.probe(model='learned', mode='eager', device='cpu', dtype='float32', shape='small', batch_size=2,"
            " accum=2, steps=1, profile=True)")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=HERE,
                       env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=120)
    found = json.loads(re.search(r'^PROBE (.*)$', r.stdout, re.M)[1])
    assert found['syncs'] == {'aten::item': 2, 'aten::_local_scalar_dense': 2}  # one per micro-step


def test_run_ends_a_command_out_of_time(tmp_path):
    t0 = time.time()
    rc, text = gpu_check.run(['bash', '-c', 'echo started; sleep 30 & wait'], 1, str(tmp_path / 'log'))
    assert rc == 'timeout' and 'started' in text and time.time() - t0 < 10
    assert gpu_check.failed(rc, text) == 'ran out of its time'


def test_synthetic_data_is_valid_and_learnable(tmp_path):
    gpu_check.write_synthetic(str(tmp_path), n_train=5000, n_val=1000)
    meta = check_data(str(tmp_path), 200, lambda: 'no data')
    assert meta['vocab_size'] == 50257 and meta['train_tokens'] == 5000
    tokens = np.fromfile(tmp_path / 'train.bin', dtype=np.uint16)
    successors = {}
    for a, b in zip(tokens[:-1], tokens[1:]):
        successors.setdefault(a, set()).add(b)
    assert max(len(s) for s in successors.values()) <= 4  # each token is followed by one of 4: far below ln(50257)


@pytest.mark.parametrize('name, peak', [('NVIDIA H100 80GB HBM3', 989.4e12), ('NVIDIA H100 PCIe', 756e12),
                                        ('NVIDIA H100 NVL', 835.5e12), ('NVIDIA H200', 989.4e12),
                                        ('NVIDIA GH200 480GB', 989.4e12), ('NVIDIA A100-SXM4-80GB', 312e12),
                                        ('NVIDIA GeForce RTX 4090', None)])
def test_gpu_peaks(name, peak):
    assert gpu_check.gpu_peak(name) == peak


# bench.py's output on a GPU (the lines gpu_check reads; figures made up)
BENCH_GPU = """device: NVIDIA H200; dtype bfloat16; torch 2.11.0+cu128

seed shapes: micro-batch 50 x 200 tokens
mode      dtype     model                    params      active   ms/step     tok/s  peak MiB GFLOP/tok    MFU warm-up s
compiled  bfloat16  learned              15,335,424  15,335,424       8.0 1,250,000      9000     0.110  13.9%      41.2
compiled  bfloat16  baseline             15,441,192  15,441,192       7.5 1,333,333      8000     0.102  13.8%      38.0
          bfloat16  learned/baseline: step time 1.067x, FLOPs 1.074x
          projected full seed run (learned, bfloat16, 26000 steps of 50 x 16 sequences) on this device, compiled: 0.9 h
summary: step time vs baseline seed/compiled/bfloat16 learned 1.067x; FLOP ratio seed learned 1.074x
"""


def test_report_judges_the_goals_on_a_gpu(monkeypatch):
    monkeypatch.setattr(gpu_check, 'dry_run', False)
    monkeypatch.setattr(gpu_check, 'peak', 989.4e12)
    rows, hours = gpu_check.parse_bench(BENCH_GPU)
    assert hours == 0.9 and rows['learned']['mem_mib'] == 9000 and rows['learned']['ratio'] == pytest.approx(8 / 7.5)
    assert rows['learned']['mfu'] == pytest.approx(0.110e9 * 1.25e6 / 989.4e12)
    train = {'ok': True, 'steps': 200, 'done': 200, 'recompiles': 1, 'recompiles_after': 0, 'falls': True,
             'falls_on': 'val 10.800 -> 6.600',
             'loss': (10.9, 6.5), 'val': ((0, 10.8), (200, 6.6)), 'tok_s': 1.2e6, 'cmd': 'train.py ...'}
    probe = {'ok': True, 'mode': 'default', 'first_step_s': 3.0, 'micro_step_s': 0.008, 'tok_s': 1.25e6,
             'mfu': 0.14, 'mem_mib': 9000.0, 'events': 5000, 'syncs': {}, 'sync_warnings': []}
    results = {'data': {'ok': True, 'detail': 'wiki_sample'},
               'bench': {'ok': True, 'rows': rows, 'bench_hours': hours, 'cmd': 'bench.py ...'},
               'train learned': dict(train, step_s=0.13), 'train baseline': dict(train, step_s=0.125),
               'torchrun learned': dict(train, falls=False, falls_on='train 10.900 -> 10.900', val=None),
               'torchrun baseline': {'ok': False, 'error': 'ran out of its time', 'log': 'compiling\n'},
               'sync learned': probe, 'sync baseline': dict(probe, syncs={'cudaStreamSynchronize': 1}),
               'mode reduce-overhead': dict(probe, mode='reduce-overhead', micro_step_s=0.004)}
    report = gpu_check.report(results, time.time() - 400, 'NVIDIA H200')
    s = summary(report)
    hours = 26000 * 0.13 * (1 + 53 * 400 / 3 / 16 / 26000) / 3600
    assert s['projected seed run < 1 h'] == ('PASS', f'{hours:.2f} h')
    assert s['learned/baseline <= 1.10x, train.py step'] == ('PASS', '1.04 x')
    assert s['learned/baseline <= 1.10x, bench.py'] == ('PASS', '1.07 x')
    assert s['torchrun learned: loss falls'] == ('FAIL', 'train 10.900 -> 10.900')
    assert s['torchrun baseline: loss falls'][0] == 'not run'
    assert s['baseline: no host sync in one profiled step'] == ('FAIL', 'cudaStreamSynchronize x1')
    assert s['learned: no host sync in one profiled step'] == ('PASS', 'none')
    assert '| learned | 8.0 | 1,250,000 | 13.9% | 1.067x | 9000 | 41.2 |' in report
    assert '| reduce-overhead | 3.0 | 4.00 | 1,250,000 | 14.0% | 2.00x speed |' in report
    assert '| torchrun baseline | FAILED: ran out of its time |' in report and '### torchrun baseline' in report
    assert '**Dry run**' not in report
