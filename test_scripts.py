"""sample.py, plot.py, bench.py and reproduce.py on tiny trained checkpoints (CPU): sampling, the charts,
a smoke run of bench.py, and reproduce.py at toy size: the whole study (data, two runs at a time, a commit
per finished run, endpoints, paired statistics against a hand computation, the report, resume, refusal to
mix designs), its schedule, and the calibration pilot."""

import csv
import json
import math
import os
import re
import runpy
import subprocess
import sys

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


def test_plot_train_panel_has_every_step_and_panels_cover_the_run(tmp_path, monkeypatch):
    """The train panel draws the evaluations and the per-step training loss; every panel spans the run,
    also the step panels whose last logged step comes before the last evaluation."""
    run = tmp_path / 'run'
    run.mkdir()
    recs = [{'iter': i, 'loss': 6 - i / 100, 'ce': 6 - i / 100, 'keep': 0.9, 'penalty': 0.4} for i in range(0, 450, 50)]
    recs += [{'iter': i, 'train/loss': 5.9 - i / 100, 'val/loss': 6 - i / 120} for i in (0, 250, 500)]
    (run / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in recs))
    figs = []
    monkeypatch.setattr(plot, 'save', lambda fig, out, stem: figs.append(fig) or [])
    plot.main([str(run), f'--out={tmp_path}'])
    train_ax = figs[0].axes[0]
    ys = sorted(tuple(line.get_xdata()) for line in train_ax.lines)
    assert ys == sorted([(0, 250, 500), tuple(range(0, 450, 50))])
    assert all(ax.get_xlim()[1] >= 500 for ax in figs[0].axes[:4])


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
            label = line.get_label().removeprefix('_')  # '_name': the run's per-step line, kept out of the legend
            assert colour.setdefault(label, line.get_color()) == line.get_color(), label
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


def test_bench_projects_the_seed_run_in_every_dtype(monkeypatch, capsys):
    """The projected wall time of the full seed run is printed for each dtype asked for, from that dtype's
    step time (bench_train faked: its figures are made up)."""
    import bench
    for k in ('shapes', 'modes', 'dtype', 'generate', 'memory', 'batch_size'):  # main() sets them: restored after
        monkeypatch.setattr(bench, k, getattr(bench, k))
    step_s = {'float32': 2.0, 'bfloat16': 1.0}

    def fake_train(shape, mode, dev, dtypes, B):
        return {(kind, d): dict(params=1, active=1, s=step_s[d], tok_s=1.0, mem_mib=None, mfu=None, flops_tok=1e9,
                                warmup_s=0.0) for d in dtypes for kind in ('learned', 'baseline')}
    monkeypatch.setattr(bench, 'bench_train', fake_train)
    monkeypatch.setattr(bench, 'check_memory', lambda *a, **k: None)
    monkeypatch.setattr(sys, 'argv', ['bench.py', '--shapes=seed', '--modes=eager', '--dtype=float32,bfloat16',
                                      '--batch_size=25', '--generate=False', '--memory=False'])
    bench.main()
    hours = dict(re.findall(r'projected full seed run \(learned, (\w+), .*: ([\d.]+) h', capsys.readouterr().out))
    per_step = bench.seed_run_steps * bench.seed_run_accum * (50 / 25) / 3600  # hours per second of micro-step
    assert hours == {d: f'{s * per_step:.1f}' for d, s in step_s.items()}


STUDY_TOY = ['--tuned=baseline,baseline_dropout0.2,learned_shift0', '--rows=baseline,learned_shift0,learned_random',
             '--rows2=baseline,best_dropout,learned_shift0', '--pilot_rows=baseline', '--lrs=1e-3,2e-3',
             '--penalties=0.1,0.3', '--pilot_factors=1,2', '--lengthen=1', '--tune_seeds=1', '--seeds=2', '--seeds2=2', '--max_iters=4',
             '--eval_interval=2', '--warmup_iters=1', '--train_tokens=3000', '--train_tokens2=4000', '--val_tokens=1500',
             '--vocab_size=300', '--learned_shape=n_layer=1,n_embd=16,n_head=2',
             '--baseline_shape=n_layer=1,n_embd=17,n_head=1', '--learned_shape2=n_layer=1,n_embd=24,n_head=2',
             '--baseline_shape2=n_layer=1,n_embd=26,n_head=1',
             '--train_args=block_size=16,batch_size=8,gradient_accumulation_steps=1,eval_windows=all,eval_halves=True,'
             'log_interval=1,compile=False,dtype=float32']


def evals_of(folder):
    return [json.loads(x) for x in open(os.path.join(folder, 'metrics.jsonl')) if 'val_select/loss' in x]


def select_score(folder):
    """A run's best val_select CE and the val_test CE at that evaluation, by hand."""
    best = min(evals_of(folder), key=lambda r: r['val_select/loss'])
    return best['val_select/loss'], best['val_test/loss']


@pytest.mark.slow
def test_reproduce_smoke(data_dir, tmp_path, capsys):
    """The whole v3 pipeline at toy size: data, tuning (a grid edge extended, the penalty chosen), S1,
    the S2 pilot and S2, the stopping-fair endpoint, the mask analysis of every learned run, paired
    statistics and charts, a commit per finished run; a second invocation runs nothing."""
    git = lambda *a: subprocess.run(['git', '-C', str(tmp_path), *a], capture_output=True, text=True)  # noqa: E731
    git('init', '-q')
    git('config', 'user.email', 'study@example.org')
    git('config', 'user.name', 'study')
    res = tmp_path / 'res'
    args = [sys.executable, os.path.join(HERE, 'reproduce.py'), *STUDY_TOY, f'--data_dir={data_dir}',
            f'--out_root={tmp_path / "out"}', f'--results_dir={res}', '--jobs=2', '--commit=True']
    r = subprocess.run(args, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    assert 'S1 parameters: learned 8,704' in r.stdout and 'S2 parameters: learned 15,936' in r.stdout
    done = re.findall(r'^(\S+): done in', r.stdout, re.M)
    assert len(done) == len(set(done)) and 'every stage asked for is complete' in r.stdout
    # tuning: each row's rate is the one with the lowest best val_select; a best rate at the grid's edge
    # (2e-3) got one more rate beyond it (4e-3), and no more
    tune = res / 'tune'
    chosen = {}
    for row in ('baseline', 'baseline_dropout0.2', 'learned_shift0'):
        scores = {lr: select_score(tune / f'{row}_lr{lr}_s2001')[0] for lr in ('0.001', '0.002', '0.004')
                  if (tune / f'{row}_lr{lr}_s2001').exists()}
        assert ('0.004' in scores) == (min(scores, key=scores.get) != '0.001' and
                                       scores['0.002'] < scores['0.001']), scores
        chosen[row] = float(min(scores, key=scores.get))
    assert not list(tune.glob('*lr0.008*')) and not list(tune.glob('*lr0.0005*'))
    pen = {0.1: select_score(tune / f"learned_shift0_lr{chosen['learned_shift0']:g}_s2001")[0],
           0.3: select_score(tune / f"learned_shift0_lr{chosen['learned_shift0']:g}_pen0.3_s2001")[0]}
    penalty = min(pen, key=pen.get)
    md = (res / 'results.md').read_text()
    assert f"| mean best val_select CE | {pen[0.1]:.4f} | {pen[0.3]:.4f} | {penalty:g} |" in md
    test_ce = [select_score(tune / f"learned_shift0_lr{chosen['learned_shift0']:g}{tag}_s2001")[1] for tag in ('', '_pen0.3')]
    assert f"| mean val_test CE there (not used to choose) | {test_ce[0]:.4f} | {test_ce[1]:.4f} | |" in md
    # S1: every run at its row's rate (learned_random at learned_shift0's) and the chosen penalty; the
    # random control keeps at the rate the chosen learned run kept in training
    conf = lambda stage, name: json.load(open(res / stage / name / 'config.json'))  # noqa: E731
    assert conf('s1', 'baseline_s1338')['learning_rate'] == chosen['baseline']
    assert conf('s1', 'learned_shift0_s1337')['penalty_coeff'] == penalty
    steps = [json.loads(x) for x in open(tune / f"learned_shift0_lr{chosen['learned_shift0']:g}"
                                         f"{'' if penalty == 0.1 else '_pen0.3'}_s2001" / 'metrics.jsonl') if '"keep"' in x]
    q = sum(x['keep'] for x in steps[-max(1, len(steps) // 10):]) / max(1, len(steps) // 10)
    rnd = conf('s1', 'learned_random_s1337')
    assert rnd['learning_rate'] == chosen['learned_shift0'] and 0.5 * math.cos(rnd['shift_init']) + 0.5 == pytest.approx(q)
    # the pilot: S2's factor is the one with the lower best val_select; S2 runs at S1's rate times it
    pilot = {f: select_score(res / 'pilot' / f'baseline_x{f}_s3001')[0] for f in (1, 2)}
    factor = min(pilot, key=pilot.get)
    best_dropout = 'baseline_dropout0.2'  # the only dropout row tuned here
    assert conf('s2', f'{best_dropout}_s1337')['learning_rate'] == pytest.approx(chosen[best_dropout] * factor)
    assert conf('s2', 'learned_shift0_s1338')['max_iters'] == 6 and conf('pilot', 'baseline_x1_s3001')['max_iters'] == 3
    # the endpoint: val_test at the evaluation with the lowest val_select, by hand, in results.csv
    with open(res / 'results.csv') as f:
        per_run = {(x['size'], x['row'], x['seed']): x for x in csv.DictReader(f)}
    for (size, row, seed), x in per_run.items():
        assert float(x['primary']) == pytest.approx(select_score(res / f's{size[1]}' / f'{row}_s{seed}')[1], rel=1e-12)
    d = [float(per_run['S1', 'learned_shift0', s]['primary']) - float(per_run['S1', 'baseline', s]['primary'])
         for s in ('1337', '1338')]
    mean, half = sum(d) / 2, 12.7062047 * abs(d[0] - d[1]) / 2  # t(0.975, 1) * sd / sqrt(2)
    s1 = md[md.index('## S1: paired'):md.index('## S2: results')]
    line = next(x for x in s1.splitlines() if x.startswith('| learned_shift0 | baseline |'))
    assert f'{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}] (n=2)' in line and 'Holm (5%, m=2)' in s1
    # the claims section words that same difference by the declared rule, and compares the sizes
    claim = next(x for x in md.splitlines() if x.startswith('| 1. beats no dropout | S1 | learned_shift0 − baseline |'))
    word = ('supported' if mean < 0 else 'contradicted') if '| distinguishable |' in line else 'not distinguishable'
    assert f'{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}] (n=2)' in claim and f'| {word}' in claim
    assert 'does the mask depend on the input?' in md and '| learned_shift0 | S1 | ' in md
    assert next(x for x in md.splitlines() if x.startswith('| learned_shift0 − baseline | ')).count('(n=2)') == 2
    with open(res / 'along.csv') as f:  # the difference along training, at every evaluation
        along = [x for x in csv.DictReader(f) if (x['size'], x['row'], x['reference']) == ('S1', 'learned_shift0', 'baseline')]
    curves = [{e['iter']: e['val_test/loss'] for e in evals_of(res / 's1' / f'{row}_s1337')} for row in ('learned_shift0', 'baseline')]
    assert [int(x['iter']) for x in along] == [0, 2, 4]
    assert [x['n'] for x in along] == ['2'] * 3
    assert nonempty_image(res / 'along_S1.png') and nonempty_image(res / 'along_S2.png')
    assert nonempty_image(res / 'masks_S1.png') and nonempty_image(res / 'masks_S2.png')
    assert curves[0][4] != curves[1][4]
    # every learned run keeps its best weights (no optimizer) and its mask analysis on val_test
    for name in ('learned_shift0_s1337', 'learned_random_s1338'):
        kept = torch.load(res / 's1' / name / 'model.pt', weights_only=True)
        after_start = [e for e in evals_of(res / 's1' / name) if e['iter'] > 0]  # train.py saves no step-0 model
        assert 'optimizer' not in kept and kept['iter_num'] == min(after_start, key=lambda e: e['val_select/loss'])['iter']
        report = json.load(open(res / 's1' / name / 'mask_analysis_model_val_test.json'))
        assert report['split'] == 'val_test' and len(report['layers']) == 1
    assert 'majority per channel − CE' in md
    assert sorted(os.listdir(res / 's1' / 'baseline_s1337')) == ['config.json', 'metrics.jsonl']
    # one commit per finished run, then the report; nothing left uncommitted
    log = git('log', '--format=%s').stdout.splitlines()
    assert log[0] == 'study v3: the report and its charts' and len(log) == len(done) + 1, log
    assert git('status', '--porcelain', 'res').stdout == ''
    # resumable: nothing left to run; report_only rebuilds the same tables; another design is refused
    r = subprocess.run(args, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and 'done in' not in r.stdout, r.stderr
    r = subprocess.run(args + ['--report_only=True'], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and (res / 'results.md').read_text() == md
    r = subprocess.run(args + ['--report_only=True', '--warmup_iters=2'], capture_output=True, text=True, timeout=240)
    assert r.returncode != 0 and 'was trained with warmup_iters=1, this study has warmup_iters=2' in r.stderr
    # a damaged run is named, in one line: a config.json that is no JSON object, a loss that is not finite
    run = res / 's1' / 'baseline_s1338'
    good = (run / 'config.json').read_text()
    (run / 'config.json').write_text('[1, 2')
    r = subprocess.run(args + ['--report_only=True'], capture_output=True, text=True, timeout=240)
    assert r.returncode != 0 and f'{run}/config.json is unreadable' in r.stderr and 'Traceback' not in r.stderr
    (run / 'config.json').write_text(good)
    lines = (run / 'metrics.jsonl').read_text().splitlines()
    k = next(i for i, x in enumerate(lines) if 'val_test/loss' in x)
    lines[k] = json.dumps(dict(json.loads(lines[k]), **{'val_test/loss': float('nan')}))
    (run / 'metrics.jsonl').write_text('\n'.join(lines) + '\n')
    r = subprocess.run(args + ['--report_only=True'], capture_output=True, text=True, timeout=240)
    assert r.returncode != 0 and f'{run}/metrics.jsonl: a loss that is not a finite number at iter 0' in r.stderr


@pytest.mark.slow
def test_reproduce_hands_runs_to_a_scheduler(data_dir, tmp_path):
    """executor=submitit_local: the same runs as submitit jobs, collected the same way."""
    res = tmp_path / 'res'
    args = [sys.executable, os.path.join(HERE, 'reproduce.py'), *STUDY_TOY, '--tuned=baseline', '--rows=baseline',
            '--rows2=baseline', '--lrs=1e-3,2e-3', '--stages=tune', f'--data_dir={data_dir}',
            f'--out_root={tmp_path / "out"}', f'--results_dir={res}', '--jobs=2', '--executor=submitit_local']
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    names = sorted(re.findall(r'^tune/(\S+): done in', r.stdout, re.M))
    assert names[:2] == ['baseline_lr0.001_s2001', 'baseline_lr0.002_s2001'] and len(names) in (2, 3)
    assert os.listdir(tmp_path / 'out' / 'submitit')  # submitit's own job folder
    log = (tmp_path / 'out' / 'tune' / 'baseline_lr0.001_s2001' / 'train.log').read_text()
    assert 'step 4/4' in log


@pytest.mark.slow
def test_reproduce_children_die_with_it(data_dir, tmp_path):
    """SIGKILL of reproduce.py (no handler can run) still ends its train.py child: the kernel sends it
    SIGTERM (parent-death signal), and train.py saves a checkpoint and exits."""
    import signal
    import time
    out = tmp_path / 'out'
    args = [sys.executable, os.path.join(HERE, 'reproduce.py'), *STUDY_TOY, '--tuned=baseline', '--rows=baseline',
            '--rows2=baseline', '--lrs=1e-3', '--stages=tune', '--max_iters=100000', '--eval_interval=50000',
            f'--data_dir={data_dir}', f'--out_root={out}', f'--results_dir={tmp_path / "res"}']
    parent = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = out / 'tune' / 'baseline_lr0.001_s2001' / '.lock'
    deadline = time.time() + 120
    while not (lock.exists() and lock.read_text().strip()) and time.time() < deadline:
        time.sleep(0.2)
    child = int(lock.read_text())
    time.sleep(2)
    parent.kill()
    parent.wait()
    deadline = time.time() + 60
    while os.path.exists(f'/proc/{child}') and time.time() < deadline:
        time.sleep(0.2)
    alive = os.path.exists(f'/proc/{child}') and 'Z' not in open(f'/proc/{child}/stat').read().split()[2]
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive


def test_study_shapes():
    """Each row trains at its size's shape for its config's width: the learned rows and the width control
    at the learned shape, the rest at the plain one; an explicit expert width scales with the model's;
    S2 keeps S1's tokens per parameter and passes (steps, evaluations and warm-up scaled with the data)."""
    import reproduce
    for size, (ls, bs) in (('S1', (reproduce.learned_shape, reproduce.baseline_shape)),
                           ('S2', (reproduce.learned_shape2, reproduce.baseline_shape2))):
        learned, baseline = reproduce.parse_kv(ls), reproduce.parse_kv(bs)
        for row in reproduce.CONFIGS:
            if row.startswith(('quick', 'small')):
                continue
            want = learned if row.startswith('learned') or row == 'baseline_narrow' else baseline
            got = reproduce.run_settings(row, size, 1337, 1e-3)
            assert {k: got[k] for k in want} == want, (size, row)
        assert reproduce.run_settings('moe_flops', size, 1337, 1e-3)['expert_hidden'] == 4 * baseline['n_embd']
    s1, s2 = reproduce.size('S1'), reproduce.size('S2')
    ratio = reproduce.train_tokens2 / reproduce.train_tokens
    assert s2['max_iters'] / s1['max_iters'] == pytest.approx(ratio, rel=0.01)
    assert s2['max_iters'] // s2['eval_interval'] == s1['max_iters'] // s1['eval_interval']
    counts = {s: reproduce.shape_params(s) for s in ('S1', 'S2')}
    for s, c in counts.items():
        assert abs(c['learned'] / c['baseline'] - 1) < 0.01, s
    assert reproduce.train_tokens2 / counts['S2']['baseline'] == pytest.approx(reproduce.train_tokens / counts['S1']['baseline'], rel=0.01)
    one = reproduce.run_settings('baseline', 'S1', 1337, 2e-3)
    assert one['min_lr'] == 2e-4 and one['lr_decay_iters'] == one['max_iters'] and one['eval_halves'] is True


def test_study_tuning_rules(monkeypatch, tmp_path):
    """The choices on planted scores: the lowest mean best val_select wins; a best rate at an edge of the
    grid gets one more rate beyond it, once; the penalty at the method's rate; the best dropout rate; the
    random control's keep rate; the stages wait for what they need."""
    import reproduce
    for k, v in dict(tuned='baseline,baseline_dropout0.2,baseline_dropout0.1,learned_shift0', lrs='1e-3,2e-3,4e-3',
                     penalties='0,0.1,0.3', tune_seeds=2, rows='baseline,learned_shift0,learned_random').items():
        monkeypatch.setattr(reproduce, k, v)
    best = {'baseline': 4e-3, 'baseline_dropout0.2': 2e-3, 'baseline_dropout0.1': 1e-3, 'learned_shift0': 8e-3}
    ran = []

    def fake(t):
        ran.append(t['name'])
        s = t['settings']
        lr, row = s['learning_rate'], t['row']
        # a V in log(rate) around each row's planted best; dropout 0.1 lower overall; penalty 0.3 best
        score = 5 + abs(math.log2(lr / best[row])) * 0.1 - (0.05 if row == 'baseline_dropout0.1' else 0)
        score -= 0.01 * (s.get('penalty_coeff', 0.1) == 0.3)
        return {'select': score + 0.001 * (s['seed'] - 2001), 'keep_train': 0.4 + 0.1 * (s['seed'] - 2001),
                'inside': not (row == 'baseline_dropout0.1' and lr == 1e-3 and late)}
    late = False
    monkeypatch.setattr(reproduce, 'result', fake)
    c = reproduce.tuning()
    assert c['lr'] == {'baseline': 4e-3, 'baseline_dropout0.2': 2e-3, 'baseline_dropout0.1': 1e-3, 'learned_shift0': 8e-3}
    assert set(c['scores']['baseline']) == {1e-3, 2e-3, 4e-3, 8e-3}  # 4e-3 at the edge: 8e-3 tried, and lost
    assert set(c['scores']['baseline_dropout0.1']) == {5e-4, 1e-3, 2e-3, 4e-3}
    assert set(c['scores']['baseline_dropout0.2']) == {1e-3, 2e-3, 4e-3}
    assert set(c['scores']['learned_shift0']) == {1e-3, 2e-3, 4e-3, 8e-3}  # best beyond the edge: extended once only
    assert c['penalty'] == 0.3 and c['keep'] == pytest.approx(0.45) and c['best_dropout'] == 'baseline_dropout0.1'
    assert c['complete'] and 'learned_shift0_lr0.008_pen0.3_s2002' in [t['name'] for t in c['tasks']]
    s = reproduce.main_settings('learned_random', 'S1', 1337, c)
    assert s['learning_rate'] == 8e-3 and 0.5 * math.cos(s['shift_init']) + 0.5 == pytest.approx(0.45)
    assert reproduce.main_settings('learned_shift0', 'S1', 1337, c)['penalty_coeff'] == 0.3
    assert reproduce.size_rows('S2', c)[1] == 'baseline_dropout0.1'
    # learned_penalty0.1: learned_shift0's config file at weight 0.1 (in its settings, so a changed config
    # file cannot change it unseen) and at learned_shift0's rate; a row that would repeat the method's runs
    # at the chosen weight is left out, at either size
    monkeypatch.setattr(reproduce, 'rows', 'baseline,learned_shift0,learned_no_penalty,learned_penalty0.1')
    monkeypatch.setattr(reproduce, 'rows2', 'baseline,learned_shift0,learned_penalty0.1')
    s = reproduce.main_settings('learned_penalty0.1', 'S1', 1337, c)
    assert s['learning_rate'] == 8e-3 and s['penalty_coeff'] == 0.1
    assert reproduce.row_config('learned_penalty0.1')['penalty_coeff'] == 0.1
    launched = []
    monkeypatch.setattr(reproduce, 'launch', lambda cmd, *a: launched.append(cmd))
    monkeypatch.setattr(reproduce, 'out_root', str(tmp_path))
    reproduce.start_run(reproduce.task('s1', 'learned_penalty0.1_s1337', 'learned_penalty0.1', s))
    assert launched[0][2] == os.path.join(HERE, 'config', 'learned_shift0.py')
    for weight, dropped in ((0.3, []), (0.0, ['learned_no_penalty']), (0.1, ['learned_penalty0.1'])):
        rows = reproduce.size_rows('S1', dict(c, penalty=weight))
        assert set(reproduce.rows.split(',')) - set(rows) == set(dropped), weight
    assert reproduce.size_rows('S2', dict(c, penalty=0.1)) == ['baseline', 'learned_shift0']
    assert c['length'] == 1.0 and reproduce.main_tasks('s1', c)[0]['settings']['max_iters'] == reproduce.max_iters
    # the length check: dropout 0.1's best evaluation is its last in both tuning seeds at its chosen rate
    late = True
    c = reproduce.tuning()
    assert c['unsettled'] == ['baseline_dropout0.1'] and c['length'] == 1.5
    s1 = reproduce.main_tasks('s1', c)[0]['settings']
    assert s1['max_iters'] == s1['lr_decay_iters'] == 1.5 * reproduce.max_iters
    assert s1['warmup_iters'] == round(1.5 * reproduce.warmup_iters) and s1['eval_interval'] == reproduce.eval_interval
    late = False
    # nothing finished yet: only the first grid is known, and no stage after tuning has a task
    monkeypatch.setattr(reproduce, 'result', lambda t: None)
    tasks, c, _ = reproduce.plan()
    assert len(tasks['tune']) == 4 * 3 * 2 and not tasks['s1'] and not tasks['pilot'] and not tasks['s2']
    assert [t['name'] for t in tasks['tune'][:2]] == ['baseline_lr0.001_s2001', 'baseline_lr0.002_s2001']
    assert tasks['tune'][12]['name'] == 'baseline_lr0.001_s2002'  # seed-major: every cell's first seed first
    # half the seeds finished: no choice yet, the finished seeds' means shown as such
    monkeypatch.setattr(reproduce, 'result', lambda t: fake(t) if t['settings']['seed'] == 2001 else None)
    c = reproduce.tuning()
    assert c['lr']['baseline'] is None and not c['scores']['baseline']
    assert c['partial']['baseline'][4e-3] == (pytest.approx(5.0), 1)
    assert reproduce.cell_text(c['scores']['baseline'], c['partial']['baseline'], 4e-3) == '5.0000 (1 of 2 seeds)'


def test_study_statistics_hand_cases():
    """The paired 95% interval, Holm's step-down and the declared comparisons on planted numbers."""
    import reproduce
    d = [-0.10, -0.05, -0.08, -0.02, -0.07]  # mean -0.064, sd 0.030496
    s = reproduce.paired(d)
    assert s['n'] == 5 and s['mean'] == pytest.approx(-0.064) and s['sd'] == pytest.approx(0.0304959, rel=1e-5)
    assert s['half'] == pytest.approx(2.7764451 * 0.0304959 / 5 ** 0.5, rel=1e-5)  # t(0.975, 4) from the tables
    assert s['p'] == pytest.approx(0.009359, abs=1e-5)  # t = -4.6927, 4 degrees of freedom
    assert reproduce.paired([0.1])['half'] is None
    # Holm: sorted p 0.005 <= 0.05/4, 0.01 <= 0.05/3, 0.03 > 0.05/2: stop; 0.04 is not rejected either
    assert reproduce.holm({'a': 0.01, 'b': 0.04, 'c': 0.03, 'd': 0.005}) == {'a': True, 'b': False, 'c': False, 'd': True}
    assert reproduce.holm({'a': 0.02, 'b': 0.03}) == {'a': True, 'b': True}  # 0.02 <= 0.025, 0.03 <= 0.05
    rows = ['baseline', 'baseline_dropout0.1', 'baseline_dropout0.2', 'learned_shift0', 'learned_static']
    assert reproduce.comparisons(rows, 'baseline_dropout0.1', 'S1') == [
        ('learned_shift0', 'baseline'), ('learned_shift0', 'baseline_dropout0.2'),
        ('learned_shift0', 'baseline_dropout0.1'), ('learned_static', 'learned_shift0'),
        ('baseline_dropout0.2', 'baseline'), ('baseline_dropout0.1', 'baseline')]
    assert reproduce.comparisons(['baseline', 'baseline_dropout0.1', 'learned_shift0'], 'baseline_dropout0.1', 'S2') == [
        ('learned_shift0', 'baseline'), ('learned_shift0', 'baseline_dropout0.1'), ('baseline_dropout0.1', 'baseline')]
    # the difference along training by sign: the band's side of 0 at each step, consecutive steps merged
    along = [(0, {'mean': 0.0, 'half': 0.0}), (1, {'mean': 0.0, 'half': None}), (2, {'mean': -0.3, 'half': 0.1}),
             (4, {'mean': -0.2, 'half': 0.1}), (6, {'mean': 0.05, 'half': 0.1}), (8, {'mean': 0.2, 'half': 0.1}),
             (10, {'mean': 0.1, 'half': 0.1})]  # at 10 the band touches 0: covers it
    signs = reproduce.along_signs(along)
    assert signs == [(0, '0'), (2, '−'), (4, '−'), (6, '0'), (8, '+'), (10, '0')]
    assert reproduce.sign_runs(signs) == '0 at 0; − 2-4; 0 at 6; + at 8; 0 at 10'


def test_study_claim_wording():
    """The declared wording rule on planted differences: Holm decides supported / contradicted, claim 2
    uses the margin, the reading rule withholds or flags a verdict that rests on a row not at its
    minimum, the majority test is void for masks that keep everything, and the direction with size
    compares signs."""
    import reproduce
    pr = lambda mean, half, p=0.01: {'n': 3, 'mean': mean, 'half': half, 'sd': 0.01, 'p': p}  # noqa: E731
    assert reproduce.verdict(pr(-0.05, 0.02), True, -1) == 'supported'
    assert reproduce.verdict(pr(+0.05, 0.02), True, -1) == 'contradicted'
    assert reproduce.verdict(pr(-0.05, 0.02), True, +1) == 'contradicted'
    assert reproduce.verdict(pr(-0.05, 0.02), False, -1) == 'not distinguishable'
    assert reproduce.verdict(pr(+0.005, 0.01), False, 0) == 'competitive'  # +0.015 < +0.02
    assert reproduce.verdict(pr(+0.01, 0.01), False, 0) == 'not distinguishable'  # exactly +0.02: not below
    assert reproduce.verdict(pr(-0.05, 0.02), True, 0) == 'competitive'  # distinguishably below dropout
    assert reproduce.verdict(pr(+0.05, 0.02), True, 0) == 'contradicted'
    assert reproduce.verdict(pr(+0.012, 0.004), True, 0) == 'contradicted (yet within +0.02)'
    assert reproduce.verdict({'n': 1, 'mean': 0.1, 'half': None, 'p': None}, False, -1) == 'too few seeds'
    # every claim's pair is a declared comparison (a reversed pair would silently drop its line)
    declared = set(reproduce.COMPARISONS)
    assert all((row, ref) in declared for _, row, ref, _ in reproduce.CLAIMS)
    # the reading rule: "most seeds" is more than half (2 of 3 yes, 1 of 2 no), over all of a row's seeds
    runs = lambda *inside: {1337 + i: {'inside': x} for i, x in enumerate(inside)}  # noqa: E731
    done = {'learned_shift0': runs(1, 1, 1), 'baseline': runs(1, 0, 0), 'baseline_dropout0.1': runs(1, 0),
            'baseline_dropout0.2': runs(1, 1, 1), 'learned_no_penalty': runs(0, 0, 1), 'moe_flops': runs(0, 0, 1)}
    st = lambda mean, half, p=0.01: {'primary': pr(mean, half, p)}  # noqa: E731
    stats = {('learned_shift0', 'baseline'): st(-0.05, 0.02), ('learned_shift0', 'baseline_dropout0.1'): st(+0.005, 0.01),
             ('learned_shift0', 'baseline_dropout0.2'): st(+0.012, 0.004),
             ('learned_no_penalty', 'learned_shift0'): st(-0.05, 0.02), ('learned_shift0', 'moe_flops'): st(+0.05, 0.02)}
    rejected = {k: k[1] != 'baseline_dropout0.1' for k in stats}
    lines = reproduce.claim_lines('S1', done, stats, rejected, 'baseline_dropout0.1')
    cells = {x.split(' | ')[2]: x.split(' | ')[5:] for x in lines}
    assert len(lines) == 5 and lines[0] == (
        '| 1. beats no dropout | S1 | learned_shift0 − baseline | -0.050 [-0.070, -0.030] (n=3) | 0.0100 | '
        'withheld: baseline had not reached its minimum (else supported) | baseline: last in 2 of 3 |')
    assert cells['learned_shift0 − baseline_dropout0.1'] == ['competitive', '- |']  # last in 1 of 2: settled
    assert cells['learned_shift0 − baseline_dropout0.2'] == ['contradicted (yet within +0.02)', '- |']
    # predicts +1: no penalty worse; it was better, and learned_shift0 (favoured) is settled: no flag
    assert cells['learned_no_penalty − learned_shift0'][0] == 'contradicted'
    # against the claim while only the beaten row had not reached its minimum: no flag
    assert cells['learned_shift0 − moe_flops'] == ['contradicted', 'moe_flops: last in 2 of 3 |']
    done['learned_shift0'] = runs(0, 0, 1)
    lines = reproduce.claim_lines('S1', done, stats, rejected, 'baseline_dropout0.1')
    flagged = [x.split(' | ')[2] for x in lines if '(possibly overstated: learned_shift0 had not' in x]
    assert flagged == ['learned_shift0 − baseline_dropout0.2', 'learned_shift0 − moe_flops',
                       'learned_no_penalty − learned_shift0']
    # at S2 the best rate is dropout 0.2: its line appears once; claims without rows there are not tested
    lines = reproduce.claim_lines('S2', done, {k: stats[k] for k in list(stats)[:3]}, {}, 'baseline_dropout0.2')
    assert sum('baseline_dropout0.2 |' in x for x in lines) == 1
    assert [x.split(' | ')[0] for x in lines if 'not tested at S2' in x] == [
        '| 3. a strong contender to MoE', '| 5. the penalty matters']
    # the majority test: positive, void (masks keep everything), below 0, covering 0
    mask = lambda ce, maj, keep: {'masks': {'ce': ce, 'ce_majority': maj, 'layers': [{'keep': 1.0}, {'keep': keep}]}}  # noqa: E731
    learned = {'learned_shift0': {1: mask(4.0, 4.02, 0.5), 2: mask(4.1, 4.13, 0.4), 3: mask(4.2, 4.225, 0.45)},
               'learned_penalty0.1': {1: mask(4.0, 4.0, 0.995), 2: mask(4.1, 4.1, 0.999)},
               'learned_no_penalty': {1: mask(4.0, 4.03, 0.5), 2: mask(4.1, 4.09, 0.4)},
               'learned_fourier': {1: mask(4.0, 3.98, 0.5), 2: mask(4.1, 4.079, 0.4), 3: mask(4.2, 4.18, 0.4)},
               'learned_soft': {1: mask(4.0, 4.0, 0.98), 2: mask(4.1, 4.1, 1.0)},  # one run below 0.99
               'learned_static': {1: mask(4.0, 4.5, 0.5), 2: mask(4.1, 4.6, 0.4)}}
    lines = reproduce.mask_claim_lines('S1', learned)
    assert len(lines) == 5  # the static control reads no input by construction
    assert lines[0].startswith('| learned_shift0 | S1 | +0.025 [+0.013, +0.037] (n=3) | 0.400 |') and \
        'yes: the loss rises without it' in lines[0]
    assert '| 0.995 | not tested' in lines[1] and 'not shown: the interval covers 0' in lines[2]  # mean +0.01
    assert 'not shown: the loss falls with majority masks' in lines[3]
    assert '| 0.980 | not shown: the interval covers 0' in lines[4]
    per_size = {'S1': {('a', 'b'): st(-0.05, 0.02), ('c', 'b'): st(0.01, 0.02), ('d', 'b'): st(0.02, 0.01)},
                'S2': {('a', 'b'): st(+0.03, 0.02), ('c', 'b'): st(0.02, 0.05), ('d', 'b'): st(0.02, None)}}
    assert reproduce.direction_lines(per_size) == [
        '| a − b | -0.050 [-0.070, -0.030] (n=3) | +0.030 [+0.010, +0.050] (n=3) | differs |',
        '| c − b | +0.010 [-0.010, +0.030] (n=3) | +0.020 [-0.030, +0.070] (n=3) | same |']
    assert reproduce.direction_lines({'S1': per_size['S1']}) == []


def test_mask_tables_leave_undefined_shares_and_tests_empty():
    """A mask that never varies has no within-channel share (mask_analysis reports None), and soft masks
    have no sampled test: both are '-', the rest of the row as measured."""
    import reproduce

    def masks(m_var, within, sampled):
        layer = dict(m_var=m_var, within_share=within, constant_share=1.0, mi_bits=0.0, mi_null_bits=0.0, keep=1.0)
        return {'masks': dict(ce=4.0, ce_majority=4.0, ce_mean=4.01, ce_sampled=sampled, layers=[layer])}
    done = {'learned_random': {1: masks(0.0, None, 4.02), 2: masks(0.0, None, 4.04)},
            'learned_soft': {1: masks(0.01, 0.7, None), 2: masks(0.03, 0.9, None)}}
    md = reproduce.mask_lines(done)
    rows = {line.split(' | ')[0] + ' | ' + line.split(' | ')[1]: line.split(' | ') for line in md if '| 0 |' in line}
    assert rows['| learned_random | 0'][3] == '-' and rows['| learned_soft | 0'][3] == '0.800 ± 0.141'
    ce = [line for line in md if line.startswith('| learned_') and '| 0 |' not in line]
    assert ce[0].endswith('| +0.030 [-0.097, +0.157] (n=2) |') and ce[1].endswith('| - |')


def test_plot_damaged_runs(tmp_path, capsys):
    """plot.py on hand-written metrics: non-finite losses and ragged keep_per_layer are left out with a
    warning; a long run name still makes a file; a corrupt config.json is one line naming it."""
    run = tmp_path / 'run'
    run.mkdir()
    recs = [{'iter': i, 'loss': 5.0 - 0.1 * i, 'keep': 0.9, 'keep_per_layer': [0.9, 0.8]} for i in range(6)]
    recs[3]['loss'] = float('inf')
    recs[4]['keep_per_layer'] = [0.5]
    recs += [{'iter': i, 'train/loss': 5.0 - 0.1 * i, 'val/loss': v} for i, v in ((0, 5.2), (5, float('nan')))]
    (run / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in recs))
    (run / 'config.json').write_text(json.dumps({'wandb_run_name': 'x' * 300}))
    out = tmp_path / 'charts'
    out.mkdir()
    plot.main([str(run), f'--out={out}'])
    err = capsys.readouterr().err
    assert 'not finite numbers at 2 record(s) from iter 3' in err and 'keep_per_layer has another length' in err
    names = sorted(os.listdir(out))
    assert 'curves.png' in names and any(n.startswith('keep_layers_xxx') and len(n) < 140 for n in names), names
    assert not [n for n in names if n.endswith('.tmp')]
    (run / 'config.json').write_text('[1, 2')
    with pytest.raises(SystemExit, match=r'cannot read .*config.json \(JSONDecodeError\)'):
        plot.main([str(run), f'--out={out}'])
