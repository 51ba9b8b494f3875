"""sample.py, plot.py, bench.py and reproduce.py on tiny trained checkpoints (CPU): sampling, the charts,
a smoke run of bench.py, and reproduce.py at toy size: the whole study (data, two runs at a time, a commit
per finished run, endpoints, paired statistics against a hand computation, the report, resume, refusal to
mix designs), its schedule, and the calibration pilot."""

import csv
import json
import os
import re
import runpy
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import plot

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope='module')
def runs(data_dir, tmp_path_factory):
    """Tiny trained run folders {'learned': path, 'baseline': path}."""
    out = {}
    for model_type in ('learned', 'baseline'):
        d = str(tmp_path_factory.mktemp(model_type))
        subprocess.run([sys.executable, os.path.join(HERE, 'train.py'), f'--model_type={model_type}',
                        '--dataset=wiki_sample', f'--data_dir={data_dir}', f'--out_dir={d}', '--n_layer=2',
                        '--n_embd=32', '--n_head=2', '--block_size=32', '--batch_size=4',
                        '--gradient_accumulation_steps=1', '--max_iters=12', '--eval_interval=6', '--eval_iters=2',
                        '--log_interval=2', '--learning_rate=3e-3', '--warmup_iters=2', '--shift_init=1.5',
                        '--compile=False'],
                       check=True, capture_output=True)
        out[model_type] = d
    return out


def sample(capsys, *argv):
    """Run sample.py in this process; (exit code, stdout, stderr)."""
    old = sys.argv
    sys.argv = ['sample.py', *argv]
    code = 0
    try:
        runpy.run_path(os.path.join(HERE, 'sample.py'), run_name='__main__')
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int) and e.code:
            print(e.code, file=sys.stderr)
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err


def texts(stdout):
    """The generated samples, without the timing line."""
    return [t.strip() for t in re.split(r'==== sample \d+/\d+ ====', stdout.rsplit('\n', 2)[0])[1:]]


# ---------------------------------------------------------------------------- sample.py

@pytest.mark.slow
@pytest.mark.parametrize('model_type', ['learned', 'baseline'])
def test_sample_deterministic_for_a_seed(runs, capsys, model_type):
    args = [f'--out_dir={runs[model_type]}', '--num_samples=2', '--max_new_tokens=20', '--seed=7']
    code, out1, _ = sample(capsys, *args)
    assert code == 0 and f'{model_type} model' in out1 and 'tokens/s' in out1
    assert out1.rstrip().endswith('cpu, float32)')  # 'auto' on a CPU: float32 generates faster there
    _, out4, _ = sample(capsys, *args, '--dtype=bfloat16')
    assert out4.rstrip().endswith('cpu, bfloat16)')
    _, out2, _ = sample(capsys, *args)
    _, out3, _ = sample(capsys, *args[:-1], '--seed=8')
    assert texts(out1) == texts(out2)
    assert texts(out1) != texts(out3)
    assert len(texts(out1)) == 2


@pytest.mark.slow
def test_sample_stochastic_masks_change_outputs(runs, capsys):
    args = [f'--out_dir={runs["learned"]}', '--num_samples=1', '--max_new_tokens=30', '--temperature=0.5']
    _, det, _ = sample(capsys, *args)
    _, sto, _ = sample(capsys, *args, '--mask=stochastic')
    assert texts(det) != texts(sto)
    code, _, err = sample(capsys, f'--out_dir={runs["baseline"]}', '--mask=stochastic')
    assert code != 0 and 'needs a learned model' in err


@pytest.mark.slow
def test_sample_prompt_longer_than_block_size(runs, capsys, tmp_path):
    prompt = tmp_path / 'prompt.txt'
    prompt.write_text('The history of the city ' * 20)  # 100 tokens, block_size is 32
    code, out, err = sample(capsys, f'--out_dir={runs["learned"]}', f'--start=FILE:{prompt}', '--num_samples=1',
                            '--max_new_tokens=5')
    assert code == 0 and 'more than block_size=32' in err
    assert texts(out)[0].startswith('The history of the city')


@pytest.mark.slow
def test_sample_bad_checkpoints_one_line(runs, capsys, tmp_path):
    code, _, err = sample(capsys, f'--out_dir={tmp_path}')
    assert code != 0 and 'no checkpoint at' in err and len(err.strip().splitlines()) == 1
    (tmp_path / 'ckpt.pt').write_bytes(b'not a checkpoint')
    code, _, err = sample(capsys, f'--out_dir={tmp_path}')
    assert code != 0 and 'corrupt or incomplete' in err
    ckpt = torch.load(os.path.join(runs['learned'], 'ckpt.pt'), weights_only=True)
    ckpt['model_type'] = 'bogus'
    torch.save(ckpt, tmp_path / 'ckpt.pt')
    code, _, err = sample(capsys, f'--out_dir={tmp_path}')
    assert code != 0 and "unknown model_type 'bogus'" in err
    code, _, err = sample(capsys, f'--out_dir={runs["learned"]}', '--tempreature=1.0')
    assert code == 2 and "did you mean 'temperature'" in err


# ---------------------------------------------------------------------------- plot.py

def nonempty_image(path):
    return os.path.exists(path) and os.path.getsize(path) > 1000


@pytest.mark.slow
def test_plot_curves_and_layer_heatmap(runs, tmp_path):
    plot.main([runs['learned'], runs['baseline'], f'--out={tmp_path}'])
    for ext in ('png', 'svg'):
        assert nonempty_image(tmp_path / f'curves.{ext}')
    name = json.load(open(os.path.join(runs['learned'], 'config.json')))['wandb_run_name']
    assert nonempty_image(tmp_path / f'keep_layers_{name}.png')
    svg = (tmp_path / 'curves.svg').read_text()
    assert 'learned' in svg and 'baseline' in svg  # one legend entry per run


@pytest.mark.slow
@pytest.mark.parametrize('bands', [False, True])
def test_plot_colours_follow_the_run(runs, tmp_path, monkeypatch, bands):
    """A run (a group with --bands) has one colour in every panel, also in the keep-fraction panel where
    the baseline drawn before it has no line."""
    figs = []
    monkeypatch.setattr(plot, 'save', lambda fig, out, stem: figs.append(fig) or [])
    plot.main([runs['baseline'], runs['learned'], f'--out={tmp_path}'] + (['--bands'] if bands else []))
    colour = {}
    for ax in figs[0].axes:
        for line in ax.lines:
            assert colour.setdefault(line.get_label(), line.get_color()) == line.get_color(), line.get_label()
    assert len(colour) == 2 and len(set(colour.values())) == 2
    assert len(set(plot.run_colors([f'run{i}' for i in range(13)]).values())) == 13


@pytest.mark.slow
def test_plot_masks_from_checkpoint(runs, tmp_path):
    plot.main([runs['learned'], f'--out={tmp_path}', '--mask_text=The Moon orbits the Earth.'])
    name = os.path.basename(runs['learned'])
    assert nonempty_image(tmp_path / f'masks_{name}.png')
    tokens, keep = plot.token_layer_keep(runs['learned'], 'The Moon orbits the Earth.', 'ckpt.pt')
    assert keep.shape == (2, len(tokens)) and ((keep >= 0) & (keep <= 1)).all()


@pytest.mark.slow
def test_plot_bad_input(runs, tmp_path):
    with pytest.raises(SystemExit, match='no metrics file'):
        plot.main([str(tmp_path), f'--out={tmp_path}'])
    with pytest.raises(SystemExit, match='mask charts need a learned model'):
        plot.main([runs['baseline'], f'--out={tmp_path}', '--mask_text=hello'])


# ---------------------------------------------------------------------------- bench.py, reproduce.py

@pytest.mark.slow
def test_bench_smoke():
    r = subprocess.run([sys.executable, os.path.join(HERE, 'bench.py'), '--shapes=quick', '--modes=eager',
                        '--dtype=float32,bfloat16', '--batch_size=1', '--steps=1', '--rounds=1', '--gen_tokens=4',
                        '--gen_prompts=1,4'], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    import runtime
    assert lines[0].startswith(f'device: {runtime.cpu_kind()}')  # every figure names its CPU and flags
    for dt in ('float32', 'bfloat16'):
        for kind in ('learned', 'baseline'):
            row = next(line for line in lines if line.startswith(f'eager     {dt:9} {kind} '))
            assert float(row.split()[7]) > 100  # peak MiB of a fresh process running the step
    assert 'speed-up' in r.stdout
    summary = lines[-1]
    assert summary.startswith('summary: step time vs baseline quick/eager/float32 learned ')
    assert 'FLOP ratio quick learned' in summary and 'KV-cache generation speed-up quick prompt 1' in summary
    assert 'dtype speed-up quick/eager learned bfloat16' in summary


def test_bench_small_shapes_take_any_learned_or_baseline_config():
    import bench
    model_type, args = bench.model_spec('baseline_dropout0.2', 'small')
    assert model_type == 'baseline' and args['dropout'] == 0.2 and args['n_embd'] == 52 and args['vocab_size'] == 2048
    assert bench.model_spec('learned_no_penalty', 'small')[1]['penalty_coeff'] == 0.0
    with pytest.raises(bench.ShapeError, match='moe_params has no small shape'):
        bench.model_spec('moe_params', 'small')


STUDY_TOY = ['--rows=learned_shift0,baseline', '--min_seeds=2', '--min_seeds_other=2', '--max_seeds=2', '--max_iters=4',
             '--train_tokens=3000', '--val_tokens=1500', '--vocab_size=300',
             '--learned_shape=n_layer=1,n_embd=16,n_head=2', '--baseline_shape=n_layer=1,n_embd=17,n_head=1',
             '--train_args=block_size=16,batch_size=8,gradient_accumulation_steps=1,warmup_iters=1,eval_interval=1,'
             'eval_windows=all,log_interval=1,'
             'compile=False,dtype=float32']


@pytest.mark.slow
def test_reproduce_smoke(data_dir, tmp_path, capsys):
    """The whole study pipeline at toy size: data, 2 rows x 2 seeds, endpoints, paired statistics, the
    report and its charts; a second invocation runs nothing; a run finished but not yet copied resumes."""
    git = lambda *a: subprocess.run(['git', '-C', str(tmp_path), *a], capture_output=True, text=True)  # noqa: E731
    git('init', '-q')
    git('config', 'user.email', 'study@example.org')
    git('config', 'user.name', 'study')
    args = [sys.executable, os.path.join(HERE, 'reproduce.py'), *STUDY_TOY, f'--data_dir={data_dir}',
            f'--out_root={tmp_path / "out"}', f'--results_dir={tmp_path / "res"}', '--jobs=2', '--commit=True']
    r = subprocess.run(args, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    assert 'parameters: learned 8,704' in r.stdout and 'baseline 8,619' in r.stdout and '+0.99%' in r.stdout
    # two at a time, one thread each (the order is test_study_schedule's)
    assert sorted(re.findall(r'^(\S+): done in', r.stdout, re.M)) == ['baseline_s1337', 'baseline_s1338',
                                                                       'learned_shift0_s1337', 'learned_shift0_s1338']
    # every finished run was committed with the report as it stood; nothing is left uncommitted
    log = git('log', '--format=%s').stdout.splitlines()
    assert log[0] == 'study: the report and its charts' and len(log) == 5, log
    assert all(re.fullmatch(r'study: \S+_s133[78] finished \(\d finished runs?\)', s) for s in log[1:]), log
    assert log[4].endswith('(1 finished run)') and log[1].endswith('(4 finished runs)')
    assert 'res/results.md' in git('show', '--name-only', '--format=', 'HEAD~4').stdout
    # the charts (they change with every run) come with the last commit only; nothing is left uncommitted
    assert 'res/bands.png' in git('show', '--name-only', '--format=', 'HEAD').stdout
    assert 'res/bands.png' not in git('show', '--name-only', '--format=', 'HEAD~1').stdout
    assert git('status', '--porcelain', 'res').stdout == ''
    # the data: GPT-2 cut to 299 ranks + <|endoftext|> = 299, whole documents, ids < 300
    data = os.path.join(data_dir, 'study_v300_t3000_val1500')
    meta = json.load(open(os.path.join(data, 'meta.json')))
    assert meta['tokenizer_cut'] == 299 and meta['vocab_size'] == 300 and meta['eot_token'] == 299
    train = np.fromfile(os.path.join(data, 'train.bin'), dtype=np.uint16)
    assert 2000 < len(train) <= 3000 == meta['train_tokens'] + (3000 - len(train)) and train[-1] == 299
    assert train.max() == 299 and not [f for f in os.listdir(data) if f.endswith('.tmp')]
    from tokenizer import get_gpt2, get_gpt2_cut
    first_doc = get_gpt2().decode(np.fromfile(os.path.join(data_dir, 'wiki_sample', 'train.bin'),
                                              dtype=np.uint16)[:2000].tolist()).split('<|endoftext|>')[0]
    assert get_gpt2_cut(299).decode(train[:list(train).index(299)].tolist()) == first_doc
    # every run: metrics and config only (no checkpoint), evaluated on every val window
    res = tmp_path / 'res'
    assert sorted(os.listdir(res / 'baseline_s1337')) == ['config.json', 'metrics.jsonl']
    assert json.load(open(res / 'learned_shift0_s1338' / 'config.json'))['tokenizer_cut'] == 299
    # the checkpoint says which tokenizer made its data, so sample.py and plot.py encode and decode its text
    ckpt = torch.load(tmp_path / 'out' / 'learned_shift0_s1337' / 'ckpt.pt', weights_only=True)
    assert ckpt['tokenizer_cut'] == 299
    code, out, err = sample(capsys, f'--out_dir={tmp_path / "out" / "learned_shift0_s1337"}', '--start=The Moon',
                            '--num_samples=1', '--max_new_tokens=8')
    assert code == 0 and texts(out)[0].startswith('The Moon'), err
    # the tables: per row, and the paired differences against a hand computation from the per-run csv
    md = (res / 'results.md').read_text()
    assert '| learned_shift0 | 2 | 8,704 |' in md and '| baseline | 2 | 8,619 |' in md
    assert '| train tokens per parameter | 2.5 |' in md and 'GPT-2 cut to its first 299 ranks' in md
    with open(res / 'results.csv') as f:
        per_run = {(x['row'], x['seed']): x for x in csv.DictReader(f)}
    d = [float(per_run['learned_shift0', s]['primary']) - float(per_run['baseline', s]['primary']) for s in ('1337', '1338')]
    mean, half = sum(d) / 2, 12.7062047 * abs(d[0] - d[1]) / 2  # t(0.975, 1) * sd / sqrt(2), sd = |d0 - d1| / sqrt(2)
    line = next(x for x in md.splitlines() if x.startswith('| learned_shift0 | baseline |'))
    assert f'{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}] (n=2)' in line
    assert 'distinguishable' in line  # Holm over the one comparison
    with open(res / 'differences.csv') as f:
        diffs = list(csv.DictReader(f))
    assert [(x['row'], x['reference'], x['endpoint']) for x in diffs][:2] == [
        ('learned_shift0', 'baseline', 'primary'), ('learned_shift0', 'baseline', 'best_val')]
    assert float(diffs[0]['ci_high']) - float(diffs[0]['mean']) == pytest.approx(half, rel=1e-6)
    assert nonempty_image(res / 'bands.png')
    # resumable: nothing left to run; a run that finished in out/ but was not copied is resumed, not redone
    # (in this process from here on: no interpreter start-up)
    def again(*extra):
        old = sys.argv
        sys.argv = args[1:] + list(extra)
        try:
            runpy.run_path(args[1], run_name='__main__')
            code = 0
        except SystemExit as e:
            code = 1 if isinstance(e.code, str) else e.code or 0
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        finally:
            sys.argv = old
        return code
    assert again() == 0 and ': done in' not in capsys.readouterr().out
    shutil.rmtree(res / 'learned_shift0_s1338')
    assert again() == 0
    out = capsys.readouterr().out
    assert re.findall(r'^(.+): done in', out, re.M) == ['learned_shift0_s1338'] and '(resumed)' in out
    assert (res / 'learned_shift0_s1338' / 'metrics.jsonl').exists()
    # report_only rebuilds the same table; another design's results are refused, not mixed in
    assert again('--report_only=True') == 0 and (res / 'results.md').read_text() == md
    assert again('--report_only=True', '--max_iters=5') != 0
    assert 'no finished runs of this design' in capsys.readouterr().err
    assert again('--report_only=True', '--learning_rate=1e-3') != 0
    assert 'was trained with learning_rate=' in capsys.readouterr().err


@pytest.mark.slow
def test_calibration_pilot(data_dir, tmp_path):
    """The pilot at toy size: the learning-rate cells (baseline, learned_shift0) and the subset cells
    (baseline, dropout 0.2) land in calibration.md with their numbers; a second invocation runs nothing."""
    args = [sys.executable, os.path.join(HERE, 'reproduce.py'), *STUDY_TOY, f'--data_dir={data_dir}',
            f'--out_root={tmp_path / "out"}', f'--results_dir={tmp_path / "res"}', '--calibrate=True',
            '--calib_lrs=1e-3', '--calib_lr_tokens=3000', '--calib_iters=3', '--calib_tokens=2500', '--jobs=2']
    r = subprocess.run(args, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    assert sorted(re.findall(r'^calibration/(\S+): done in', r.stdout, re.M)) == [
        'baseline_dropout0.2_t2500_i4_lr0.002', 'baseline_t2500_i4_lr0.002', 'baseline_t3000_i3_lr0.001',
        'learned_shift0_t3000_i3_lr0.001']
    md = (tmp_path / 'res' / 'calibration.md').read_text()
    evals = lambda name: [json.loads(x) for x in open(tmp_path / 'res' / 'calibration' / name / 'metrics.jsonl')  # noqa: E731
                          if 'val/loss' in x]
    b, lrn = evals('baseline_t3000_i3_lr0.001')[-1], evals('learned_shift0_t3000_i3_lr0.001')[-1]
    assert re.search(rf"^\| 0.001 \| {b['val/loss']:.3f} \| {lrn['val/loss']:.3f} \| [\d.]+, [\d.]+, [\d.]+ \|$", md, re.M)
    b, d = (evals(f'{row}_t2500_i4_lr0.002') for row in ('baseline', 'baseline_dropout0.2'))
    delta = sum(x['val/loss'] for x in d[-3:]) / 3 - sum(x['val/loss'] for x in b[-3:]) / 3
    row = next(x for x in md.splitlines() if re.match(r'\| [\d,]+ \| 4 \|', x))
    assert row.split(' | ')[4] == f"{b[-1]['val/loss']:.3f}" and row.endswith(f'| {delta:+.3f} |')
    assert "This study (reproduce.py's defaults): 3,000 train tokens" in md
    r = subprocess.run(args, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and 'done in' not in r.stdout, r.stderr


def test_study_shapes():
    """Each row trains at the study shape of its config's width: the learned rows and the width control
    (a plain GPT as wide as the learned model) at learned_shape, the rest at baseline_shape; an explicit
    expert width scales with the model's."""
    import reproduce
    shape = lambda row: {k: reproduce.run_settings(row, 1337)[k] for k in ('n_layer', 'n_embd', 'n_head')}  # noqa: E731
    learned, baseline = reproduce.parse_kv(reproduce.learned_shape), reproduce.parse_kv(reproduce.baseline_shape)
    assert learned != baseline
    for row in reproduce.ROWS:
        want = learned if row.startswith('learned') or row == 'baseline_narrow' else baseline
        assert shape(row) == want, row
    assert reproduce.row_config('baseline_narrow')['model_type'] == 'baseline'
    assert reproduce.run_settings('moe_flops', 1337)['expert_hidden'] == 4 * baseline['n_embd']
    assert 'expert_hidden' not in reproduce.run_settings('moe_params', 1337)


def test_study_schedule(monkeypatch):
    """Priority rows' seeds first (seed-major), then the others; then a seed more for a comparison whose
    interval is wider than target_ci, until max_seeds."""
    import reproduce
    for k, v in dict(min_seeds=2, min_seeds_other=1, max_seeds=3, target_ci=0.04).items():
        monkeypatch.setattr(reproduce, k, v)
    rows = ['learned_shift_pi', 'learned_shift0', 'baseline']
    done = {r: {} for r in rows}
    order = []
    while (nxt := reproduce.next_run(rows, done)) and len(order) < 20:
        k, row = nxt
        done[row][k] = {'primary': 5.0 + (0.1 * (-1) ** k if row == 'learned_shift_pi' else 0.001 * k)}
        order.append(f'{row}:{k}')
    # learned_shift_pi vs baseline is noisy (+-0.1): it gets seeds 1 and 2; learned_shift0 is tight after 2 seeds
    assert order == ['baseline:0', 'learned_shift0:0', 'baseline:1', 'learned_shift0:1', 'learned_shift_pi:0',
                     'learned_shift_pi:1', 'baseline:2', 'learned_shift_pi:2']
    # runs in flight (jobs > 1) are not started twice: the next free one in the same order
    empty = {r: {} for r in rows}
    assert reproduce.next_run(rows, empty, busy={'baseline_s1337'}) == (0, 'learned_shift0')
    assert reproduce.next_run(rows, empty, busy={'baseline_s1337', 'learned_shift0_s1337'}) == (1, 'baseline')
    noisy = {'baseline': {0: {'primary': 5.0}, 1: {'primary': 5.0}},
             'learned_shift0': {0: {'primary': 5.0}, 1: {'primary': 5.001}},
             'learned_shift_pi': {0: {'primary': 5.1}, 1: {'primary': 4.9}}}
    assert reproduce.next_run(rows, noisy) == (2, 'baseline')
    assert reproduce.next_run(rows, noisy, busy={'baseline_s1339'}) == (2, 'learned_shift_pi')
    assert reproduce.next_run(rows, noisy, busy={'baseline_s1339', 'learned_shift_pi_s1339'}) is None


def test_study_families():
    """Two Holm families: every row against baseline and dropout 0.2 (the declared one), then the other
    rows against learned_shift0; each table's numbers are the paired statistics of its own pairs."""
    import reproduce
    rows = ['learned_shift0', 'learned_shift_pi', 'baseline', 'baseline_dropout0.2']
    assert reproduce.comparisons(rows) == [
        ('learned_shift0', 'baseline'), ('learned_shift_pi', 'baseline'), ('baseline_dropout0.2', 'baseline'),
        ('learned_shift0', 'baseline_dropout0.2'), ('learned_shift_pi', 'baseline_dropout0.2')]
    assert reproduce.method_comparisons(rows) == [('learned_shift_pi', 'learned_shift0')]
    assert reproduce.method_comparisons(['baseline', 'learned_shift_pi']) == []
    run = lambda v: {'primary': v, 'best_val': v, 'final_train': 3.0, 'curve': [(4.0, v), (3.0, v)]}  # noqa: E731
    done = {'learned_shift0': {0: run(5.00), 1: run(5.02), 2: run(5.01)},
            'learned_shift_pi': {0: run(5.10), 1: run(5.11), 2: run(5.13)}}
    csv_rows = []
    md = reproduce.differences_table(done, reproduce.method_comparisons(rows[:2]), csv_rows)
    s = reproduce.paired([0.10, 0.09, 0.12])
    line = next(x for x in md if x.startswith('| learned_shift_pi | learned_shift0 |'))
    assert f"{s['mean']:+.3f} [{s['mean'] - s['half']:+.3f}, {s['mean'] + s['half']:+.3f}] (n=3)" in line
    assert 'Holm (5%, m=1)' in md[0] and '| +0.073 |' in line  # the seed: shift pi 3.457 - shift 0 3.384
    assert [(r['row'], r['reference'], r['endpoint']) for r in csv_rows][0] == ('learned_shift_pi', 'learned_shift0', 'primary')
    assert csv_rows[0]['holm_rejected'] == (s['p'] <= 0.05) and csv_rows[2]['mean'] == pytest.approx(s['mean'])  # fit


def test_study_statistics_hand_cases():
    """The paired 95% interval, the t quantiles, Holm's step-down and the fit-matched val on planted numbers."""
    import reproduce
    for df, t in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (7, 2.3646), (30, 2.0423)):  # tables of t(0.975, df)
        assert reproduce.t_quantile(0.975, df) == pytest.approx(t, abs=1e-4)
    d = [-0.10, -0.05, -0.08, -0.02, -0.07]  # mean -0.064, sd 0.030496
    s = reproduce.paired(d)
    assert s['n'] == 5 and s['mean'] == pytest.approx(-0.064) and s['sd'] == pytest.approx(0.0304959, rel=1e-5)
    assert s['half'] == pytest.approx(2.7764451 * 0.0304959 / 5 ** 0.5, rel=1e-5)
    assert s['p'] == pytest.approx(0.009359, abs=1e-5)  # t = -4.6927, 4 degrees of freedom (scipy.stats.t.sf)
    assert reproduce.paired([0.1])['half'] is None
    # Holm: sorted p 0.005 <= 0.05/4, 0.01 <= 0.05/3, 0.03 > 0.05/2: stop; 0.04 is not rejected either
    assert reproduce.holm({'a': 0.01, 'b': 0.04, 'c': 0.03, 'd': 0.005}) == {'a': True, 'b': False, 'c': False, 'd': True}
    assert reproduce.holm({'a': 0.02, 'b': 0.03}) == {'a': True, 'b': True}  # 0.02 <= 0.025, 0.03 <= 0.05
    # fit-matched: tau = the worse (higher) final train CE; the other run's val is read where it had that train CE
    a = {'final_train': 3.0, 'curve': [(5.0, 5.5), (4.0, 5.0), (3.0, 5.2)]}
    b = {'final_train': 2.5, 'curve': [(5.0, 5.4), (3.5, 5.0), (2.5, 5.6)]}
    assert reproduce.val_at_train(a['curve'], 3.5) == pytest.approx(5.1)
    assert reproduce.fit_matched(a, b) == pytest.approx(5.2 - 5.3)  # b at train 3.0: halfway from 5.0 to 5.6
    assert reproduce.val_at_train(a['curve'], 2.0) is None
