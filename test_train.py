"""train.py and configurator.py, run as users run them: configuration (overrides, types, every config
file loads and builds), tiny runs of the models, a user-defined mask from the README's recipe, a new
model setting in one edit, exact resume (also after SIGTERM), SIGTERM during start-up, the NaN guard,
2-process DDP on gloo with the replicas' weights compared, the run-folder lock, stale temporaries, a torn
metrics line, a finished run, a full disk, wandb offline, data and checkpoint errors."""

import ast
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import runtime
from configurator import ConfigError, configure

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ['--dataset=wiki_sample', '--n_layer=2', '--n_embd=32', '--n_head=2', '--block_size=32',
        '--batch_size=4', '--gradient_accumulation_steps=2', '--eval_iters=4', '--log_interval=1',
        '--warmup_iters=2', '--learning_rate=3e-3', '--min_lr=3e-4', '--lr_decay_iters=100', '--compile=False']


def train(data_dir, out_dir, *args, timeout=240, **kw):
    cmd = [sys.executable, os.path.join(HERE, 'train.py'), *TINY, f'--data_dir={data_dir}',
           f'--out_dir={out_dir}', *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def ok(r):
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def error_line(r):
    """The one line a failed run printed: non-zero exit, no traceback."""
    assert r.returncode != 0
    assert 'Traceback' not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def records(out_dir):
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------- configurator

DEFAULTS = dict(n_layer=12, learning_rate=6e-4, dropout_n_head=None, compile=False, out_dir='out',
                wandb_run_name=None, shift_init=0.0)


def test_config_overrides_and_types():
    c = configure(dict(DEFAULTS), ['--n_layer=4', '--learning_rate=1', '--dropout_n_head=3',
                                   '--compile=True', '--out_dir=2024', '--wandb_run_name=x'])
    assert c['n_layer'] == 4 and c['learning_rate'] == 1.0 and isinstance(c['learning_rate'], float)
    assert c['dropout_n_head'] == 3 and c['compile'] is True and c['out_dir'] == '2024'
    assert c['wandb_run_name'] == 'x'


@pytest.mark.parametrize('arg,message', [
    ('--n_layers=4', "unknown config key 'n_layers'; did you mean 'n_layer'?"),
    ('--n_layer=4.5', 'n_layer expects int'),
    ('--n_layer=four', 'n_layer expects int'),
    ('--compile=1', 'compile expects bool'),
    ('--learning_rate=fast', 'learning_rate expects float'),
    ('--compile', "malformed argument '--compile'"),
    ('--=3', 'malformed argument'),
    ('config/no_such_file.py', 'config file not found: config/no_such_file.py'),
])
def test_config_errors(arg, message):
    with pytest.raises(ConfigError, match=message.replace('?', r'\?').replace('(', r'\(')):
        configure(dict(DEFAULTS), [arg])


def test_space_form_and_overrides_win_wherever_they_stand(tmp_path):
    """--key value is --key=value (as argparse scripts accept it); an override placed before a config file
    still wins over it; a bare last --key is malformed and the message names one of this script's options."""
    cfg = tmp_path / 'cfg.py'
    cfg.write_text("n_layer = 6\nout_dir = 'out/cfg'\n")
    c = configure(dict(DEFAULTS), ['--n_layer', '2', str(cfg), '--out_dir', 'out/x y', '--compile', 'True'])
    assert c['n_layer'] == 2 and c['out_dir'] == 'out/x y' and c['compile'] is True
    assert configure(dict(DEFAULTS), [str(cfg), '--learning_rate', '1e-3'])['n_layer'] == 6
    with pytest.raises(ConfigError, match=r"malformed argument '--compile': write --key=value or --key value "
                                          r"\(e\.g\. --n_layer=12\)"):
        configure(dict(DEFAULTS), [str(cfg), '--compile'])


def test_config_file(tmp_path):
    good = tmp_path / 'good.py'
    good.write_text("import math\n_width = 2\nn_layer = 3 * _width\nshift_init = math.pi / 2\n")
    c = configure(dict(DEFAULTS), [str(good), '--n_layer=2'])
    assert c['n_layer'] == 2 and c['shift_init'] == pytest.approx(1.5707963)
    bad = tmp_path / 'bad.py'
    bad.write_text("learning_rat = 1e-3\n")
    with pytest.raises(ConfigError, match="bad.py: unknown config key 'learning_rat'; did you mean 'learning_rate'"):
        configure(dict(DEFAULTS), [str(bad)])
    typo = tmp_path / 'typo.py'
    typo.write_text("n_layer = '6'\n")
    with pytest.raises(ConfigError, match='n_layer expects int'):
        configure(dict(DEFAULTS), [str(typo)])
    broken = tmp_path / 'broken.py'
    broken.write_text("n_layer = 1 +\n")
    with pytest.raises(ConfigError, match='failed to run: SyntaxError'):
        configure(dict(DEFAULTS), [str(broken)])


def train_defaults():
    """train.py's default config globals, read without running it."""
    tree = ast.parse(open(os.path.join(HERE, 'train.py')).read())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id == 'config_keys':
                break
            out[node.targets[0].id] = ast.literal_eval(node.value)
    return {**out, **runtime.model_settings()[0]}  # the models' settings are their GPTConfig fields


def test_every_config_file_loads():
    for name in sorted(os.listdir(os.path.join(HERE, 'config'))):
        c = configure(train_defaults(), [os.path.join(HERE, 'config', name)])
        assert c['model_type'] in runtime.MODEL_TYPES, name
        assert c['out_dir'] == f"out/{name[:-3]}", name


@pytest.mark.parametrize('name', sorted(os.listdir(os.path.join(HERE, 'config'))))
def test_every_config_builds_its_model(name):
    """Each config file's model is built as train.py builds it (every GPTConfig field from the train.py
    globals) and runs a forward pass; the seed-shape configs keep the seed's context."""
    import dataclasses
    c = configure(train_defaults(), [os.path.join(HERE, 'config', name)])
    module = runtime.model_module(c['model_type'])
    args = {f.name: c[f.name] for f in dataclasses.fields(module.GPTConfig) if f.name != 'vocab_size'}
    m = module.GPT(module.GPTConfig(vocab_size=50257, **args))
    x = torch.randint(0, 50257, (1, 8))
    logits, loss = m(x, x)
    assert logits.shape == (1, 8, 50257) and torch.isfinite(loss)


@pytest.mark.slow
def test_train_cli_errors_are_one_line(data_dir, tmp_path):
    assert 'did you mean' in error_line(train(data_dir, tmp_path, '--n_embed=32'))
    assert "model_type must be in" in error_line(train(data_dir, tmp_path, '--model_type=bogus'))
    assert 'shift_init must be in [0, pi]' in error_line(train(data_dir, tmp_path, '--shift_init=4.0'))
    assert 'eval_interval must be >= 1' in error_line(train(data_dir, tmp_path, '--eval_interval=0'))
    assert 'must be larger than warmup_iters' in error_line(train(data_dir, tmp_path, '--lr_decay_iters=2'))


# ---------------------------------------------------------------------------- tiny runs

TRAIN_KEYS = {'iter', 'loss', 'ce', 'lr', 'ms_per_iter', 'tokens_per_s'}
MASK_KEYS = {'penalty', 'keep', 'keep_per_layer', 'mask_mean', 'mask_gt_0.9', 'mask_lt_0.1'}


@pytest.mark.slow
@pytest.mark.parametrize('model_type', ['learned', 'baseline'])
def test_tiny_training_run(data_dir, tmp_path, model_type):
    extra = ['--shift_init=1.5'] if model_type == 'learned' else ['--dropout=0.1']
    r = ok(train(data_dir, tmp_path, f'--model_type={model_type}', '--max_iters=30', '--eval_interval=15', *extra))
    recs = records(tmp_path)
    evals = [x for x in recs if 'val/loss' in x]
    steps = [x for x in recs if 'loss' in x]
    assert [x['iter'] for x in evals] == [0, 15, 30]
    assert [x['iter'] for x in steps] == list(range(30))
    assert evals[-1]['val/loss'] < evals[0]['val/loss'] - 1.0  # clearly learning
    # the first step (compilation, warm-up) is timed on its own; the others' times exclude evaluations
    assert 'first_step_s' in steps[0] and 'ms_per_iter' not in steps[0]
    assert steps[0]['machine'].startswith(runtime.cpu_kind()) and steps[0]['torch'] == torch.__version__
    assert all(TRAIN_KEYS <= set(x) for x in steps[1:])
    assert 'iter 29/30:' in r.stdout and 'ETA' in r.stdout
    assert '(warm-up)' in r.stdout and 'compilation' not in r.stdout  # nothing was compiled
    if model_type == 'learned':
        assert all(MASK_KEYS <= set(x) for x in steps)
        assert len(steps[0]['keep_per_layer']) == 2
        assert 'val/keep' in evals[-1] and len(evals[-1]['val/keep_per_layer']) == 2
        assert steps[0]['loss'] == pytest.approx(steps[0]['ce'] + 0.1 * steps[0]['penalty'], rel=1e-5)
        assert 'keep' in r.stdout
    else:
        assert not MASK_KEYS & set(steps[0])
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert ckpt['model_type'] == model_type and ckpt['iter_num'] == 30
    assert not any(k.startswith('_orig_mod.') for k in ckpt['model'])
    assert {'optimizer', 'scaler', 'rng', 'config', 'best_val_loss', 'model_args'} <= set(ckpt)
    best = torch.load(tmp_path / 'best.pt', weights_only=True)
    assert best['best_val_loss'] == pytest.approx(min(x['val/loss'] for x in evals))
    assert json.load(open(tmp_path / 'config.json'))['model_type'] == model_type


def readme_mask_recipe():
    """The code block of the README's "Your own mask" section."""
    with open(os.path.join(HERE, 'README.md')) as f:
        section = f.read().split('## Your own mask', 1)[1].split('\n## ', 1)[0]
    return section.split('```python\n', 1)[1].split('```', 1)[0]


@pytest.mark.slow
def test_user_defined_mask_trains_through_train_py(data_dir, tmp_path, monkeypatch):
    """The README's recipe, as written, trains through train.py with no edit to model.py or train.py:
    the checkpoint records the class, the logged masks are the sigmoid's, and sample.py loads it."""
    code = readme_mask_recipe()
    assert len(code.strip().splitlines()) <= 15
    (tmp_path / 'my_mask.py').write_text(code)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    r = ok(train(data_dir, tmp_path / 'run', '--max_iters=6', '--eval_interval=3', '--shift_init=1.5',
                 '--mask_class=my_mask.SigmoidMask', env=env))
    assert 'keep' in r.stdout
    ckpt = torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=True)
    assert ckpt['model_args']['mask_class'] == 'my_mask.SigmoidMask' and ckpt['iter_num'] == 6
    steps = [x for x in records(tmp_path / 'run') if 'loss' in x]
    # at shift 1.5 the method's M = 0.5 cos(1.5 + z) + 0.5 is about 0.5, the sigmoid's about 0.8
    assert steps[0]['mask_mean'] > 0.7
    monkeypatch.syspath_prepend(str(tmp_path))
    model, _ = runtime.load_model(str(tmp_path / 'run' / 'ckpt.pt'))
    assert all(type(b.learned_dropout).__name__ == 'SigmoidMask' for b in model.transformer.h)
    s = subprocess.run([sys.executable, os.path.join(HERE, 'sample.py'), f'--out_dir={tmp_path / "run"}',
                        '--num_samples=1', '--max_new_tokens=5'], capture_output=True, text=True, env=env, timeout=120)
    assert s.returncode == 0 and 'tokens/s' in s.stdout, s.stderr


@pytest.mark.slow
def test_a_new_model_setting_is_one_edit(data_dir, tmp_path):
    """One new GPTConfig field (one line, with its comment) is a train.py option at once: --help shows it
    with its default and comment, --name=value sets it, the checkpoint records it."""
    import shutil
    repo = tmp_path / 'repo'
    shutil.copytree(HERE, repo, ignore=shutil.ignore_patterns('.git', 'results', 'out*', 'data', '__pycache__'))
    src = (repo / 'model.py').read_text()
    line = "    mask_class: str = ''"
    assert line in src
    (repo / 'model.py').write_text(src.replace(line, "    my_setting: int = 3  # learned: a setting added in one edit\n" + line))
    h = subprocess.run([sys.executable, str(repo / 'train.py'), '--help'], capture_output=True, text=True, timeout=120)
    assert h.returncode == 0 and re.search(r'--my_setting\s+= 3\s+learned: a setting added in one edit', h.stdout)
    cmd = [sys.executable, str(repo / 'train.py'), *TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path / "run"}',
           '--max_iters=1', '--eval_interval=1', '--warmup_iters=1', '--my_setting=5']
    ok(subprocess.run(cmd, capture_output=True, text=True, timeout=240))
    assert torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=True)['model_args']['my_setting'] == 5


@pytest.mark.slow
def test_eval_on_every_window_is_deterministic_and_exact(data_dir, tmp_path):
    """eval_windows='all': val CE over every non-overlapping window of val (a last partial one left
    out), the same at every evaluation of the same weights, equal to a hand computation; train is
    capped at val's number of windows, spread over the split."""
    import numpy as np
    from runtime import load_model
    tiny = tmp_path / 'data' / 'tiny'
    tiny.mkdir(parents=True)
    src = os.path.join(data_dir, 'wiki_sample')
    for split, n in (('train', 3000), ('val', 1000)):  # val: 31 windows of 32 (+1 target), 7 tokens left over
        np.fromfile(os.path.join(src, f'{split}.bin'), dtype=np.uint16)[:n].tofile(tiny / f'{split}.bin')
    json.dump({'vocab_size': 50257, 'train_tokens': 3000, 'val_tokens': 1000}, open(tiny / 'meta.json', 'w'))
    run = tmp_path / 'run'
    args = ['--dataset=tiny', '--eval_windows=all', '--dtype=float32', '--max_iters=4', '--eval_interval=2']
    ok(train(tmp_path / 'data', run, *args))
    record = {f: (run / f).read_bytes() for f in ('metrics.jsonl', 'config.json')}
    r = ok(train(tmp_path / 'data', run, *args, '--init_from=resume', '--eval_only=True'))
    assert {f: (run / f).read_bytes() for f in record} == record  # an evaluation leaves the run's record alone
    evals = [x for x in records(run) if 'val/loss' in x]
    assert [x['iter'] for x in evals] == [0, 2, 4]
    assert f"train loss {evals[-1]['train/loss']:.4f}, val loss {evals[-1]['val/loss']:.4f}" in r.stdout
    model, _ = load_model(str(run / 'ckpt.pt'))
    for split, n_tokens, key in (('train', 3000, 'train/loss'), ('val', 1000, 'val/loss')):
        data = torch.from_numpy(np.fromfile(tiny / f'{split}.bin', dtype=np.uint16).astype(np.int64))
        starts = np.arange((n_tokens - 1) // 32) * 32
        if split == 'train':  # 93 windows, 31 of them (val's count) evenly spread, the first and the last included
            starts = starts[np.linspace(0, 92, 31).round().astype(int)]
        w = torch.stack([data[s:s + 33] for s in starts])
        with torch.no_grad():
            logits, _ = model(w[:, :-1], w[:, 1:])
        hand = torch.nn.functional.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten()).item()
        assert evals[-1][key] == pytest.approx(hand, rel=1e-5), split
    assert len(starts) == 31 and starts[-1] + 33 <= 3000


@pytest.mark.slow
def test_eval_halves_split_val_by_alternate_documents(data_dir, tmp_path):
    """eval_halves=True: val's documents dealt alternately into val_select and val_test, each evaluated on
    every window (eval_windows='all'), equal to a hand computation; val itself is unchanged."""
    import numpy as np
    from runtime import load_model
    src = os.path.join(data_dir, 'wiki_sample')
    meta = json.load(open(os.path.join(src, 'meta.json')))
    val = np.fromfile(os.path.join(src, 'val.bin'), dtype=np.uint16)
    val = val[:np.flatnonzero(val == meta['eot_token'])[29] + 1]  # its first 30 documents
    tiny = tmp_path / 'data' / 'tiny'
    tiny.mkdir(parents=True)
    np.fromfile(os.path.join(src, 'train.bin'), dtype=np.uint16)[:3000].tofile(tiny / 'train.bin')
    val.tofile(tiny / 'val.bin')
    json.dump(dict(meta, train_tokens=3000, val_tokens=len(val)), open(tiny / 'meta.json', 'w'))
    run = tmp_path / 'run'
    ok(train(tmp_path / 'data', run, '--dataset=tiny', '--eval_windows=all', '--eval_halves=True', '--dtype=float32',
             '--max_iters=4', '--eval_interval=2'))
    last = [x for x in records(run) if 'val/loss' in x][-1]
    model, _ = load_model(str(run / 'ckpt.pt'))
    docs = np.split(val, np.flatnonzero(val == meta['eot_token'])[:-1] + 1)
    assert len(docs) == 30
    for name, part in (('val_select', docs[0::2]), ('val_test', docs[1::2])):
        data = torch.from_numpy(np.concatenate(part).astype(np.int64))
        w = torch.stack([data[s:s + 33] for s in range(0, len(data) - 33 + 1, 32)])
        with torch.no_grad():
            logits, _ = model(w[:, :-1], w[:, 1:])
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten()).item()
        assert last[f'{name}/loss'] == pytest.approx(ce, rel=1e-5), name
    assert last['val_select/loss'] != last['val_test/loss'] and 'val/loss' in last
    # best.pt is chosen on val_select alone
    evals = [x for x in records(run) if 'val_select/loss' in x and x['iter'] > 0]
    best = torch.load(run / 'best.pt', weights_only=True)
    assert best['best_val_loss'] == pytest.approx(min(x['val_select/loss'] for x in evals), rel=1e-9)


def final_state(out_dir):
    return torch.load(os.path.join(out_dir, 'ckpt.pt'), weights_only=True)['model']


def assert_same_run(a, b, from_iter):
    ra = [x for x in records(a) if x['iter'] >= from_iter]
    rb = [x for x in records(b) if x['iter'] >= from_iter]
    strip = lambda r: {k: v for k, v in r.items() if k not in ('ms_per_iter', 'tokens_per_s', 'first_step_s', 'machine', 'torch')}
    assert [strip(x) for x in ra] == [strip(x) for x in rb]
    sa, sb = final_state(a), final_state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_exact_resume(data_dir, tmp_path):
    args = ['--max_iters=8', '--eval_interval=4', '--shift_init=1.5']
    ok(train(data_dir, tmp_path / 'a', *args))
    ok(train(data_dir, tmp_path / 'b', *args, '--max_iters=4'))
    r = ok(train(data_dir, tmp_path / 'b', *args, '--init_from=resume'))
    assert 'step 4/' not in r.stdout  # the checkpoint's evaluation is not redone
    assert_same_run(tmp_path / 'a', tmp_path / 'b', 0)


@pytest.mark.slow
def test_sigterm_saves_and_resumes_exactly(data_dir, tmp_path):
    args = ['--eval_interval=1000', '--shift_init=1.5']
    cmd = [sys.executable, '-u', os.path.join(HERE, 'train.py'), *TINY, f'--data_dir={data_dir}',
           f'--out_dir={tmp_path / "b"}', *args, '--max_iters=100000']
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:
        if line.startswith('iter 3/'):
            p.send_signal(signal.SIGTERM)
            break
    out, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err  # saved, but not a finished run: `&&` stops here
    assert 'stopped by SIGTERM' in out and '--init_from=resume' in out
    k = torch.load(tmp_path / 'b' / 'ckpt.pt', weights_only=True)['iter_num']
    assert k >= 4
    ok(train(data_dir, tmp_path / 'b', *args, f'--max_iters={k + 3}', '--init_from=resume'))
    ok(train(data_dir, tmp_path / 'a', *args, f'--max_iters={k + 3}'))
    assert_same_run(tmp_path / 'a', tmp_path / 'b', 0)


@pytest.mark.slow
def test_nan_guard_keeps_last_good_checkpoint(data_dir, tmp_path):
    ok(train(data_dir, tmp_path, '--max_iters=3', '--eval_interval=3'))
    before = (tmp_path / 'ckpt.pt').read_bytes()
    r = train(data_dir, tmp_path, '--max_iters=9', '--eval_interval=3', '--init_from=resume',
              '--learning_rate=1e30', '--decay_lr=False')
    line = error_line(r)
    assert 'nan/inf at iter' in line and 'untouched' in line
    bad = int(line.split('at iter ')[1].split(';')[0])
    assert 3 <= bad < 9
    assert (tmp_path / 'ckpt.pt').read_bytes() == before


@pytest.mark.slow
def test_ddp_two_processes_gloo(data_dir, tmp_path):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           os.path.join(HERE, 'train.py'), *TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}',
           '--max_iters=6', '--eval_interval=3', '--gradient_accumulation_steps=4', '--shift_init=1.5']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    r = ok(subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env))
    assert 'x 2 processes' in r.stdout and r.stdout.count('step 6/') == 1  # rank 0 alone logs
    recs = records(tmp_path)
    assert [x['iter'] for x in recs if 'val/loss' in x] == [0, 3, 6]
    conf = json.load(open(tmp_path / 'config.json'))
    assert conf['world_size'] == 2 and conf['tokens_per_iter'] == 4 * 4 * 32  # accumulation split over ranks
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert ckpt['iter_num'] == 6 and len(ckpt['rng']) == 2
    assert not torch.equal(ckpt['rng'][0]['batch'], ckpt['rng'][1]['batch'])  # ranks draw different batches
    # the replicas' weights agree after training (train.py checks it at every save; without the
    # all-reduce each rank would follow its own batches)
    sums = ckpt['replica_checksums']
    assert len(sums) == 2 and sums[0] == sums[1]
    single = {k: v.double().square().sum().item() for k, v in ckpt['model'].items()}
    assert sums[0] == pytest.approx(sum(single.values()) - single['transformer.wte.weight'], rel=1e-9)


# ---------------------------------------------------------------------------- bad input

@pytest.mark.slow
def test_missing_data_names_the_command(tmp_path):
    line = error_line(train(tmp_path / 'nodata', tmp_path / 'out', '--dataset=wikipedia'))
    assert "python prepare_wiki.py --max_tokens=" in line and " --dataset=wiki_sample " in line
    line = error_line(train(tmp_path / 'nodata', tmp_path / 'out', '--dataset=mine'))
    assert "--name=mine" in line


@pytest.mark.slow
def test_embedded_sample_prepared_on_first_use(tmp_path):
    import json
    r = ok(train(tmp_path / 'data', tmp_path / 'out', '--dataset=wiki_sample_v512', '--max_iters=1',
                 '--warmup_iters=1'))
    assert 'prepare_wiki.py --source=sample --vocab_size=512' in r.stdout
    meta = json.loads((tmp_path / 'data' / 'wiki_sample_v512' / 'meta.json').read_text())
    assert meta['vocab_size'] == 512 and meta['tokenizer_cut'] == 511
    r = ok(train(tmp_path / 'data', tmp_path / 'out2', '--dataset=wiki_sample_v512', '--max_iters=1',
                 '--warmup_iters=1'))
    assert 'preparing' not in r.stdout  # prepared once


@pytest.mark.slow
def test_block_size_longer_than_data(tmp_path):
    docs = tmp_path / 'docs.txt'
    docs.write_text('\n<|endoftext|>\n'.join(f'Short document {i}.' for i in range(30)))
    subprocess.run([sys.executable, os.path.join(HERE, 'prepare_wiki.py'), '--source=files', '--files', str(docs),
                    '--name=tiny', f'--data_dir={tmp_path}'], check=True, capture_output=True)
    line = error_line(train(tmp_path, tmp_path / 'out', '--dataset=tiny', '--block_size=64'))
    assert 'too few for block_size=64' in line


@pytest.mark.slow
def test_checkpoint_mismatch_and_corruption(data_dir, tmp_path):
    ok(train(data_dir, tmp_path, '--max_iters=2', '--eval_interval=2'))
    line = error_line(train(data_dir, tmp_path, '--init_from=resume', '--model_type=baseline'))
    assert "holds a 'learned' model but model_type='baseline'" in line
    line = error_line(train(data_dir, tmp_path, '--init_from=resume', '--n_layer=3'))
    assert 'n_layer=2' in line and 'n_layer=3' in line
    data = (tmp_path / 'ckpt.pt').read_bytes()
    (tmp_path / 'ckpt.pt').write_bytes(data[: len(data) // 2])
    assert 'corrupt or incomplete' in error_line(train(data_dir, tmp_path, '--init_from=resume'))
    assert 'no ' in error_line(train(data_dir, tmp_path / 'empty', '--init_from=resume'))


@pytest.mark.slow
def test_wandb_is_offline_by_default(data_dir, tmp_path):
    fake = tmp_path / 'fake'
    fake.mkdir()
    (fake / 'wandb.py').write_text(
        "import json, os\nlog_path = os.environ['FAKE_WANDB_LOG']\n"
        "def _w(x):\n    open(log_path, 'a').write(json.dumps(x) + '\\n')\n"
        "def init(**kw):\n    _w({'init': kw['name'], 'mode': os.environ.get('WANDB_MODE'), 'machine': kw['config']['machine']})\n"
        "def log(record, step=None):\n    _w({'step': step, 'text': [k for k, v in record.items() if isinstance(v, str)]})\n"
        "def finish():\n    _w({'finish': True})\n")
    env = dict(os.environ, PYTHONPATH=str(fake), FAKE_WANDB_LOG=str(tmp_path / 'w.jsonl'))
    env.pop('WANDB_MODE', None)
    ok(train(data_dir, tmp_path / 'out', '--max_iters=2', '--eval_interval=2', '--wandb_log=True', env=env))
    calls = [json.loads(line) for line in open(tmp_path / 'w.jsonl')]
    assert calls[0] == {'init': 'learned', 'mode': 'offline',
                        'machine': next(r['machine'] for r in records(tmp_path / 'out') if 'machine' in r)}
    assert len([c for c in calls if 'step' in c]) == len(records(tmp_path / 'out'))
    assert not any(c.get('text') for c in calls)  # the machine goes to wandb's config, not to its charts
    assert calls[-1] == {'finish': True}


# ---------------------------------------------------------------------------- nothing lost by mistake

@pytest.mark.slow
def test_second_run_into_a_locked_folder_is_refused(data_dir, tmp_path):
    from runtime import RunLock
    tmp_path.mkdir(exist_ok=True)
    lock = RunLock(str(tmp_path))  # as a running train.py holds it
    line = error_line(train(data_dir, tmp_path, '--max_iters=2'))
    assert f'in use by another run (pid {os.getpid()})' in line
    assert not (tmp_path / 'metrics.jsonl').exists()
    lock.file.close()  # released: a run may start
    ok(train(data_dir, tmp_path, '--max_iters=1', '--eval_interval=1', '--warmup_iters=1'))


@pytest.mark.slow
def test_stale_temporaries_are_cleaned_and_resume_survives_a_torn_metrics_line(data_dir, tmp_path):
    ok(train(data_dir, tmp_path, '--max_iters=2', '--eval_interval=2'))
    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    (tmp_path / f'ckpt.pt.{socket.gethostname()}.{dead}.tmp').write_bytes(b'partial')
    (tmp_path / 'notes.tmp').write_text('the user\'s own')  # not this code's pattern: kept
    with open(tmp_path / 'metrics.jsonl', 'a') as f:
        f.write('{"iter": 2, "loss": 3.')  # killed mid-write
    r = ok(train(data_dir, tmp_path, '--max_iters=4', '--eval_interval=2', '--init_from=resume'))
    assert 'incomplete last line' in r.stdout
    assert [p.name for p in tmp_path.glob('*.tmp')] == ['notes.tmp']
    assert [x['iter'] for x in records(tmp_path) if 'val/loss' in x] == [0, 2, 4]
    import plot
    plot.main([str(tmp_path), f'--out={tmp_path / "plots"}'])


@pytest.mark.slow
def test_finished_run_says_so(data_dir, tmp_path):
    ok(train(data_dir, tmp_path, '--max_iters=2', '--eval_interval=2'))
    config = (tmp_path / 'config.json').read_bytes()
    r = ok(train(data_dir, tmp_path, '--max_iters=2', '--eval_interval=2', '--init_from=resume'))
    assert 'the run is complete (2 of max_iters=2' in r.stdout and '--max_iters=4' in r.stdout
    assert (tmp_path / 'config.json').read_bytes() == config


@pytest.mark.slow
def test_best_checkpoint_is_written_before_the_latest(data_dir, tmp_path):
    ok(train(data_dir, tmp_path, '--max_iters=4', '--eval_interval=2'))
    assert os.stat(tmp_path / 'best.pt').st_mtime_ns <= os.stat(tmp_path / 'ckpt.pt').st_mtime_ns
    best = torch.load(tmp_path / 'best.pt', weights_only=True)
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert best['best_val_loss'] == ckpt['best_val_loss']


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import runtime
    runtime.save_torch({'a': torch.ones(3)}, str(tmp_path / 'ckpt.pt'))
    good = (tmp_path / 'ckpt.pt').read_bytes()

    def full(obj, path):
        open(path, 'wb').write(b'half')
        raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0')
    monkeypatch.setattr(torch, 'save', full)
    monkeypatch.setattr(runtime.shutil, 'disk_usage', lambda p: shutil_usage(free=0))
    with pytest.raises(runtime.RuntimeSetupError, match='no space left on device while writing .*ckpt.pt; '
                                                        'the previous checkpoint is intact'):
        runtime.save_torch({'a': torch.zeros(3)}, str(tmp_path / 'ckpt.pt'))
    assert (tmp_path / 'ckpt.pt').read_bytes() == good and not list(tmp_path.glob('*.tmp'))
    monkeypatch.setattr(json, 'dump', lambda *a, **k: (_ for _ in ()).throw(OSError(28, 'No space left on device')))
    with pytest.raises(runtime.RuntimeSetupError, match='no space left on device while writing .*meta.json'):
        runtime.save_json({}, str(tmp_path / 'meta.json'))


def shutil_usage(free):
    import collections
    return collections.namedtuple('usage', 'total used free')(100, 100 - free, free)


def catches_sigterm(pid):
    """Whether the process has installed its SIGTERM handler (Linux: the SigCgt mask in /proc)."""
    try:
        with open(f'/proc/{pid}/status') as f:
            caught = next(int(line.split()[1], 16) for line in f if line.startswith('SigCgt:'))
    except (OSError, StopIteration):
        return False
    return bool(caught >> (signal.SIGTERM - 1) & 1)


@pytest.mark.slow
@pytest.mark.parametrize('delay', [0.0, 0.3])
def test_sigterm_during_startup_exits_cleanly(data_dir, tmp_path, delay):
    """A signal right after train.py's first lines (numpy and torch half imported) or a little later: one
    line and exit code 128 + SIGTERM, not an ImportError or a SIGABRT from the interpreter's shutdown."""
    cmd = [sys.executable, os.path.join(HERE, 'train.py'), *TINY, f'--data_dir={data_dir}', f'--out_dir={tmp_path}']
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not catches_sigterm(p.pid) and time.time() < deadline:  # installed before train.py's heavy imports
        time.sleep(0.005)
    time.sleep(delay)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM and 'Traceback' not in err and 'Error' not in err, (p.returncode, err[-500:])
    assert 'during start-up; nothing was trained' in err


def test_auto_dtype_on_a_cpu(monkeypatch):
    """On a CPU with bf16 instructions 'auto' picks bf16 autocast (measured faster at every shape);
    without them, float32; an explicit dtype is kept."""
    import runtime
    monkeypatch.setattr(runtime, 'cpu_has_fast_bf16', lambda: True)
    assert runtime.pick_dtype('auto', 'cpu') == 'bfloat16'
    assert runtime.pick_dtype('float32', 'cpu') == 'float32'
    monkeypatch.setattr(runtime, 'cpu_has_fast_bf16', lambda: False)
    assert runtime.pick_dtype('auto', 'cpu') == 'float32'


# ---------------------------------------------------------------------------- how a run ends, what it advises

@pytest.mark.slow
def test_a_run_ends_with_a_summary_and_the_next_commands(data_dir, tmp_path):
    """The last lines: iterations and time, the best evaluation and the final losses (as in metrics.jsonl),
    the process's peak memory, where the checkpoints are, and the commands that sample, plot and extend it."""
    out = tmp_path / 'out'
    r = ok(train(data_dir, out, '--max_iters=4', '--eval_interval=2', '--warmup_iters=1'))
    evals = [x for x in records(out) if 'val/loss' in x]
    best = min(evals, key=lambda x: x['val/loss'])
    done = next(line for line in r.stdout.splitlines() if line.startswith('done: '))
    assert done.startswith('done: 4 iterations, ') and f"best val loss {best['val/loss']:.4f} at iter {best['iter']}" in done
    assert f"final train loss {evals[-1]['train/loss']:.4f}, val loss {evals[-1]['val/loss']:.4f} (iter 4)" in done
    assert re.search(r'; peak memory [\d,]+ MiB$', done)
    assert f'checkpoints: {out}/ckpt.pt (latest, resumable), {out}/best.pt (best val)' in r.stdout
    assert f'next: python sample.py --out_dir={out}' in r.stdout and f'python plot.py {out}' in r.stdout
    longer = next(line for line in r.stdout.splitlines() if line.endswith('(train longer)')).split('   (')[0].split()
    assert '--max_iters=8' in longer and '--init_from=resume' in longer and '--max_iters=4' not in longer
    assert re.search(r'saved \S+ckpt\.pt and best\.pt \(best val so far\)', r.stdout)
    r = ok(subprocess.run(longer, capture_output=True, text=True, timeout=240, cwd=HERE))  # the advice works
    assert 'done: 8 iterations' in r.stdout


def test_the_offline_try_keeps_the_users_settings_and_warms_up_within_the_run():
    """Without Wikipedia, the advice to try a seed config on the embedded sample keeps what the user gave
    (an explicit --compile=True, their batch size), fills in the rest from TRY_SETTINGS, warms up within
    its own run so that the learning rate peaks and the masks move, and says how long it takes."""
    import shlex
    from runtime import TRY_SETTINGS, missing_data_hint
    hint = missing_data_hint('data', 'wikipedia', ['config/learned_shift0.py', '--compile=True', '--batch_size', '16'],
                             'learned')
    cmd = shlex.split(hint.split(': ', 1)[1])
    assert cmd[:3] == ['python', 'train.py', 'config/learned_shift0.py'] and '--dataset=wiki_sample' in cmd
    assert '--compile=True' in cmd and '--compile=False' not in cmd  # the user's explicit choice stands
    assert cmd[cmd.index('--batch_size') + 1] == '16' and '--batch_size=4' not in cmd
    settings = dict(a[2:].split('=', 1) for a in cmd if a.startswith('--') and '=' in a)
    assert int(settings['warmup_iters']) < int(settings['max_iters']) == TRY_SETTINGS['max_iters']
    assert 'minutes' in hint


def test_forced_bf16_on_a_cpu_without_it_warns(monkeypatch, capsys):
    import runtime
    monkeypatch.setattr(runtime, 'cpu_has_fast_bf16', lambda: False)
    assert runtime.pick_dtype('bfloat16', 'cpu') == 'bfloat16'
    assert 'is emulated and slower than float32' in capsys.readouterr().err
    assert runtime.pick_dtype('auto', 'cpu') == 'float32' and capsys.readouterr().err == ''
    monkeypatch.setattr(runtime, 'cpu_has_fast_bf16', lambda: True)
    assert runtime.pick_dtype('bfloat16', 'cpu') == 'bfloat16' and capsys.readouterr().err == ''
