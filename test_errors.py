"""Bad input, one row per case: every script answers a mistake with one line on stderr and a non-zero
exit, never a traceback or a silent wrong run, and leaves what was already written alone.

The scripts run in this process (runpy, as `python script.py ...` would), so the table stays fast."""

import json
import os
import runpy
import shlex
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def run(capsys, script, *argv):
    """(exit code, stdout, stderr) of `python script argv` run in this process."""
    old_argv, handlers = sys.argv, {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    sys.argv = [script, *map(str, argv)]
    code = 0
    try:
        runpy.run_path(os.path.join(HERE, script), run_name='__main__')
    except SystemExit as e:
        if isinstance(e.code, str):  # sys.exit("message"), as python itself reports it
            print(e.code, file=sys.stderr)
            code = 1
        else:
            code = e.code or 0
    finally:
        sys.argv = old_argv
        for s, h in handlers.items():
            signal.signal(s, h)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope='module')
def tiny_run(data_dir, tmp_path_factory):
    """A run folder with a 2-step learned checkpoint."""
    d = str(tmp_path_factory.mktemp('tiny_run'))
    subprocess.run([sys.executable, os.path.join(HERE, 'train.py'), '--dataset=wiki_sample', f'--data_dir={data_dir}',
                    f'--out_dir={d}', '--n_layer=1', '--n_embd=16', '--n_head=1', '--block_size=16', '--batch_size=2',
                    '--gradient_accumulation_steps=1', '--max_iters=2', '--eval_interval=2', '--eval_iters=1',
                    '--warmup_iters=1', '--compile=False'], check=True, capture_output=True)
    return d


@pytest.fixture(scope='module')
def bad_data(data_dir, tmp_path_factory):
    """data folders with a corrupt meta.json, a meta.json missing a key, and ids beyond the vocabulary."""
    root = tmp_path_factory.mktemp('bad_data')
    src = os.path.join(data_dir, 'wiki_sample')
    for name in ('corrupt_meta', 'meta_no_vocab', 'big_ids'):
        shutil.copytree(src, root / name)
    (root / 'corrupt_meta' / 'meta.json').write_text('{"vocab_size": 50257, "train_')
    meta = json.load(open(os.path.join(src, 'meta.json')))
    json.dump({k: v for k, v in meta.items() if k != 'vocab_size'}, open(root / 'meta_no_vocab' / 'meta.json', 'w'))
    json.dump(dict(meta, vocab_size=1000), open(root / 'big_ids' / 'meta.json', 'w'))
    for name in ('odd_bytes', 'cut_text', 'vocab_1e9', 'train_dir'):
        shutil.copytree(src, root / name)
    with open(root / 'odd_bytes' / 'val.bin', 'ab') as f:
        f.write(b'\0')
    json.dump(dict(meta, tokenizer_cut='2047'), open(root / 'cut_text' / 'meta.json', 'w'))
    json.dump(dict(meta, vocab_size=1e9), open(root / 'vocab_1e9' / 'meta.json', 'w'))
    os.remove(root / 'train_dir' / 'train.bin')
    os.mkdir(root / 'train_dir' / 'train.bin')  # there but unreadable as a file (root reads any mode-000 file)
    return str(root)


@pytest.fixture(scope='module')
def bad_runs(tiny_run, tmp_path_factory):
    """run folders a resume must refuse: a best.pt copied as ckpt.pt, a ckpt.pt without model_args, a malicious
    pickle, a run stopped before its first checkpoint, a directory named metrics.jsonl."""
    import torch
    root = tmp_path_factory.mktemp('bad_runs')
    for name in ('copied_best', 'no_args', 'evil', 'no_ckpt', 'no_ckpt2', 'metrics_dir', 'other_run', 'config_list'):
        shutil.copytree(tiny_run, root / name)
    conf = json.load(open(root / 'other_run' / 'config.json'))  # its ckpt.pt as if copied from another run
    json.dump(dict(conf, run_id='another-run'), open(root / 'other_run' / 'config.json', 'w'))
    (root / 'config_list' / 'config.json').write_text('[1, 2]')  # valid JSON, not an object
    shutil.copy(root / 'copied_best' / 'best.pt', root / 'copied_best' / 'ckpt.pt')
    ckpt = torch.load(root / 'no_args' / 'ckpt.pt', weights_only=True)
    del ckpt['model_args']
    torch.save(ckpt, root / 'no_args' / 'ckpt.pt')

    class Evil:
        def __reduce__(self):
            return (os.system, ('echo pwned',))
    torch.save({'model': Evil()}, root / 'evil' / 'ckpt.pt')
    for f in ('ckpt.pt', 'best.pt'):
        os.remove(root / 'no_ckpt' / f)
        os.remove(root / 'no_ckpt2' / f)  # another folder: a row's run keeps its folder's lock in this process
    os.remove(root / 'metrics_dir' / 'metrics.jsonl')
    os.mkdir(root / 'metrics_dir' / 'metrics.jsonl')
    return str(root)


RESUME = ('--data_dir={data} --dataset=wiki_sample --n_layer=1 --n_embd=16 --n_head=1 --block_size=16 --batch_size=2 '
          '--warmup_iters=1 --compile=False --init_from=resume --out_dir={runs}/')
# (script, arguments, expected exit code, fragment of the one-line message); {data}, {bad}, {run}, {tmp}
# are filled in with the sample data folder, the broken data folders, a trained run and a fresh folder
ROWS = [
    # train.py: values that used to train silently wrong or crash later
    ('train.py', '--grad_clip=-1', 2, 'grad_clip must be >= 0'),
    ('train.py', '--max_iters=-5', 2, 'max_iters must be >= 0'),
    ('train.py', '--dropout_n_head=0', 2, 'bad model configuration: dropout_n_head must be >= 1 or None (= n_head), got 0'),
    ('train.py', '--dropout_n_head=abc', 2, "dropout_n_head must be int or None, got 'abc'"),
    ('train.py', '--dropout_n_head=-4', 2, 'dropout_n_head must be >= 1 or None (= n_head), got -4'),
    ('train.py', '--learning_rate=-1', 2, 'learning_rate must be > 0'),
    ('train.py', '--beta1=3', 2, 'beta1 must satisfy 0 <= beta1 < 1'),
    ('train.py', '--beta2=1.5', 2, 'beta2 must satisfy 0 <= beta2 < 1'),
    ('train.py', '--weight_decay=-0.1', 2, 'weight_decay must be >= 0'),
    ('train.py', '--penalty_coeff=-1', 2, 'penalty_coeff must be >= 0'),
    ('train.py', '--shift_init=4.0', 2, 'shift_init must be in [0, pi]'),
    ('train.py', '--dropout=1.0', 2, 'dropout must be in [0, 1), got 1.0'),
    ('train.py', '--eval_interval=0', 2, 'eval_interval must be >= 1'),
    ('train.py', '--lr_decay_iters=2', 2, 'must be larger than warmup_iters'),
    ('train.py', '--model_type=bogus', 2, "model_type must be in ('learned', 'baseline', 'moe')"),
    ('train.py', '--init_from=bogus', 2, "init_from must be in ('scratch', 'resume')"),
    ('train.py', '--dtype=bogus', 2, "dtype must be in ('auto'"),
    ('train.py', '--mask_input=bogus', 2, "mask_input must be 'mlp_output' or 'embedding', got 'bogus'"),
    ('train.py', '--mask_rounding=bogus', 2, "mask_rounding must be 'stochastic' or 'soft', got 'bogus'"),
    ('train.py', '--n_layer=None', 2, 'n_layer cannot be None'),
    ('train.py', '--n_layers=4', 2, "unknown config key 'n_layers'; did you mean 'n_layer'?"),
    ('train.py', '--n_layer=4.5', 2, 'n_layer expects int'),
    ('train.py', '--compile=1', 2, 'compile expects bool'),
    ('train.py', '--learning_rate=1e400', 2, 'learning_rate must be a finite number, got inf'),
    ('train.py', '--penalty_coeff=nan', 2, "penalty_coeff expects float"),
    ('train.py', '--penalty_coeff=1e999', 2, 'penalty_coeff must be a finite number, got inf'),
    ('train.py', '--compile', 2, "malformed argument '--compile'"),
    ('train.py', 'config/no_such_file.py', 2, 'config file not found'),
    ('train.py', '{tmp}/latin1.py', 2, 'latin1.py is not UTF-8 text'),
    ('train.py', '{tmp}/interrupt.py', 2, 'interrupt.py failed to run: KeyboardInterrupt'),
    ('train.py', '{tmp}/exits.py', 2, 'exits.py called exit (0) while it was read'),
    ('train.py', '--device=cuda', 2, "device 'cuda' is not available here; available: auto, cpu"),
    ('train.py', '--device=bogus', 2, "device 'bogus' is not available here"),
    ('train.py', '--seed=-1', 2, 'seed must be an integer in [0, 2**63)'),
    ('train.py', '--seed=18446744073709551616', 2, 'seed must be an integer in [0, 2**63)'),
    ('train.py', '--warmup_iters=30000', 2, 'warmup_iters (30000) is above max_iters (26000)'),
    ('train.py', '--min_lr=1e-2', 2, 'min_lr (0.01) is above learning_rate (0.0009)'),
    ('train.py', '--data_dir={data} --dataset=wiki_sample --batch_size=4000', 2, 'needs at least about'),
    ('train.py', '--data_dir={data} --dataset=wiki_sample --n_embd=199998', 2, 'needs at least about'),
    ('train.py', '--data_dir={data} --dataset=wiki_sample --eval_windows=all --batch_size=4000', 2, 'needs at least about'),
    ('sample.py', '--out_dir={run} --seed=-3', 2, 'seed must be an integer in [0, 2**63)'),
    ('bench.py', '--batch_size=100000 --generate=False', 1, 'needs at least about'),
    # train.py: data problems
    ('train.py', '--data_dir={tmp} --dataset=wikipedia', 1, "--data_dir={tmp} --dataset=wiki_sample --out_dir=out/try_"),
    ('train.py', '--data_dir={bad} --dataset=corrupt_meta', 1, 'meta.json cannot be read'),
    ('train.py', '--data_dir={bad} --dataset=meta_no_vocab', 1, "meta.json has no 'vocab_size'"),
    ('train.py', '--data_dir={bad} --dataset=big_ids', 1, "vocab_size is 1000"),
    ('train.py', '--data_dir={bad} --dataset=odd_bytes', 1, 'has an odd number of bytes'),
    ('train.py', '--data_dir={bad} --dataset=cut_text', 1, "tokenizer_cut must be an integer in [256, 50256]"),
    ('train.py', '--data_dir={bad} --dataset=vocab_1e9', 1, "says vocab_size=1000000000 but its tokenizer (GPT-2's) has 50257"),
    ('train.py', '--data_dir={bad} --dataset=train_dir', 1, 'train.bin: Is a directory'),
    ('train.py', '--data_dir={data} --dataset=wiki_sample --dropout=0.2 --out_dir={tmp}/o', 2,
     'dropout must be 0 in the learned model'),
    ('train.py', '--data_dir={data} --dataset=wiki_sample --init_from=resume --out_dir={tmp}/o', 1, 'no checkpoint at'),
    ('train.py', RESUME + 'copied_best', 2, 'holds no optimizer state (as a best.pt'),
    ('train.py', RESUME + 'no_args', 1, 'is not a checkpoint written by train.py (it has no model_args)'),
    ('train.py', RESUME + 'evil', 1, 'was refused as unsafe'),
    ('train.py', RESUME + 'no_ckpt', 2, 'stopped before its first checkpoint (no ckpt.pt)'),
    ('train.py', RESUME.replace('--init_from=resume ', '') + 'no_ckpt2', 2, 'start it over with --overwrite=True'),
    ('train.py', RESUME + 'metrics_dir', 1, 'metrics.jsonl is not a plain file'),
    ('train.py', RESUME + 'other_run', 2, 'belongs to another run (run_id '),
    ('plot.py', '{runs}/metrics_dir --out={tmp}', 1, 'metrics.jsonl: Is a directory'),
    ('plot.py', '{runs}/config_list --out={tmp}', 1, 'config.json is not a JSON object'),
    ('train.py', RESUME.replace('--out_dir={runs}/', '--out_dir={run}') + ' --seed=5', 2,
     'was trained with seed=1337 but this run has seed=5'),
    ('sample.py', '--out_dir={runs}/evil', 1, 'was refused as unsafe'),
    # sample.py
    ('sample.py', '--out_dir={run} --temperature=-1', 2, 'temperature must be > 0'),
    ('sample.py', '--out_dir={run} --temperature=0', 2, 'temperature must be > 0'),
    ('sample.py', '--out_dir={run} --max_new_tokens=-5', 2, 'max_new_tokens must be >= 1'),
    ('sample.py', '--out_dir={run} --num_samples=0', 2, 'num_samples must be >= 1'),
    ('sample.py', '--out_dir={run} --top_k=0', 2, 'top_k must be None (all tokens) or an int >= 1'),
    ('sample.py', '--out_dir={run} --top_k=-5', 2, 'top_k=-5 is not valid'),
    ('sample.py', '--out_dir={run} --dtype=bogus', 2, "dtype must be in ('auto'"),
    ('sample.py', '--out_dir={run} --mask=bogus', 2, "mask must be in ('deterministic', 'stochastic')"),
    ('sample.py', '--out_dir={run} --device=bogus', 2, "device 'bogus' is not available here"),
    ('sample.py', '--out_dir={run} --start=FILE:{tmp}/binary.bin', 2, 'is not UTF-8 text'),
    ('sample.py', '--out_dir={run} --start=FILE:{tmp}/missing.txt', 1, 'cannot read the prompt file'),
    ('sample.py', '--out_dir={tmp}', 1, 'no checkpoint at'),
    ('sample.py', '--out_dir={run} --top_k', 2, "write --key=value or --key value (e.g. --out_dir=out)"),
    # bench.py
    ('bench.py', '--modes=foo', 1, 'modes must be a comma-separated list of eager, compiled'),
    ('bench.py', '--shapes=foo', 1, 'shapes must be a comma-separated list of seed, quick'),
    ('bench.py', '--rounds=0', 1, 'rounds must be >= 1'),
    ('bench.py', '--gen_prompts=abc', 1, 'gen_prompts must be a comma-separated list of prompt lengths'),
    ('bench.py', '--device=bogus', 1, "device 'bogus' is not available here"),
    ('bench.py', '--models=moe_params --shapes=quick', 1, 'moe_params has no quick shape'),
    ('bench.py', '--vocab_size=100', 1, 'vocab_size must be 0 or 257..65536'),
    ('bench.py', '--loss=chunked,chunked', 1, 'loss must be chunked, full or chunked,full'),
    ('bench.py', '--models=moe_flops --shapes=small', 1, 'moe_flops has no small shape'),
    # reproduce.py
    ('reproduce.py', '--seeds=0', 1, 'seeds must be >= 1'),
    ('reproduce.py', '--lrs=1e-3,abc', 1, "lrs: 'abc' is not a number"),
    ('reproduce.py', '--lrs=1e-3,0.001', 1, 'lrs must be distinct positive finite learning rates'),
    ('reproduce.py', '--lrs=0,1e-3', 1, 'lrs must be distinct positive finite learning rates'),
    ('reproduce.py', '--penalties=0,-1', 1, 'penalties must be distinct finite penalty weights >= 0'),
    ('reproduce.py', '--pilot_factors=1,1e400', 1, 'pilot_factors must be distinct positive finite factors'),
    ('reproduce.py', '--rows=foo', 1, 'rows must be a comma-separated list of config names'),
    ('reproduce.py', '--rows=baseline,learned_shift0,baseline', 1, 'rows names a row twice'),
    ('reproduce.py', '--tuned=baseline --rows=learned_no_penalty', 1, 'add it to tuned or tune learned_shift0'),
    ('reproduce.py', '--tuned=baseline --rows=learned_penalty0.1', 1, 'add learned_shift0, whose rate it takes, to tuned'),
    ('reproduce.py', '--tuned=baseline --rows=baseline --rows2=best_dropout', 1, 'tuned has no dropout row'),
    ('reproduce.py', '--stages=s1,s1', 1, 'stages must be a comma-separated list of tune, s1, pilot, s2, each once'),
    ('reproduce.py', '--executor=pbs', 1, "executor must be in ('local', 'slurm', 'submitit_local')"),
    ('reproduce.py', '--results_dir={tmp}/binary.bin', 1, 'is a file; give a folder'),
    ('reproduce.py', '--report_only=True --results_dir={tmp}', 1, 'no finished runs of this design in'),
    ('reproduce.py', '--learned_shape=n_layer=4,n_embd=64,n_head=4 --results_dir={tmp}', 1, 'more than 1%'),
    # plot.py
    ('plot.py', '{run} --mask_text= --out={tmp}', 1, '--mask_text is empty'),
    ('plot.py', '{run} --mask_text=FILE:{tmp}/binary.bin --out={tmp}', 1, 'is not UTF-8 text'),
    ('plot.py', '{tmp} --out={tmp}', 1, 'no metrics file'),
]


@pytest.mark.slow
@pytest.mark.parametrize('script,args,code,message', ROWS, ids=[f'{r[0]} {r[1]}' for r in ROWS])
def test_bad_input_one_line(capsys, tmp_path, data_dir, bad_data, tiny_run, bad_runs, script, args, code, message):
    (tmp_path / 'binary.bin').write_bytes(bytes(range(128, 256)) * 4)
    (tmp_path / 'latin1.py').write_bytes('n_layer = 2  # caf\xe9\n'.encode('latin-1'))
    (tmp_path / 'interrupt.py').write_text('raise KeyboardInterrupt\n')
    (tmp_path / 'exits.py').write_text('import sys\nsys.exit(0)\n')
    fill = dict(data=data_dir, bad=bad_data, run=tiny_run, tmp=tmp_path, runs=bad_runs)
    got, out, err = run(capsys, script, *args.format(**fill).split())
    assert got == code, (out, err)
    assert 'Traceback' not in err
    lines = [line for line in err.strip().splitlines() if not line.startswith('warning:')]
    assert len(lines) == 1, err
    assert message.format(**fill) in lines[0], lines[0]


@pytest.mark.slow
def test_none_valued_option_is_overridable(capsys, tiny_run):
    """sample.py documents top_k=None as "all tokens": it must be accepted."""
    code, out, err = run(capsys, 'sample.py', f'--out_dir={tiny_run}', '--top_k=None', '--num_samples=1',
                         '--max_new_tokens=3')
    assert code == 0 and 'tokens/s' in out, err


@pytest.mark.slow
def test_existing_run_is_not_overwritten(capsys, data_dir, tiny_run, tmp_path):
    """Training from scratch into a folder holding a run refuses and leaves every file as it was."""
    d = tmp_path / 'run'
    shutil.copytree(tiny_run, d)
    before = {f: (d / f).read_bytes() for f in ('ckpt.pt', 'best.pt', 'metrics.jsonl')}
    code, _, err = run(capsys, 'train.py', '--dataset=wiki_sample', f'--data_dir={data_dir}', f'--out_dir={d}',
                       '--n_layer=1', '--n_embd=16', '--n_head=1', '--block_size=16', '--compile=False')
    assert code == 2 and '--init_from=resume' in err and '--overwrite=True' in err
    assert all((d / f).read_bytes() == b for f, b in before.items())


@pytest.mark.slow
def test_plot_run_name_with_a_slash(capsys, tiny_run, tmp_path):
    d = tmp_path / 'run'
    shutil.copytree(tiny_run, d)
    conf = json.load(open(d / 'config.json'))
    json.dump(dict(conf, wandb_run_name='team/exp 1'), open(d / 'config.json', 'w'))
    code, out, err = run(capsys, 'plot.py', str(d), f'--out={tmp_path / "plots"}')
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / 'plots')) == ['curves.png', 'curves.svg', 'keep_layers_team_exp_1.png',
                                                      'keep_layers_team_exp_1.svg']


@pytest.mark.parametrize('script', ['train.py', 'sample.py', 'bench.py', 'reproduce.py', 'plot.py',
                                    'prepare_wiki.py'])
def test_help(capsys, script):
    """--help prints the usage and every option with its default and comment, and exits 0."""
    code, out, err = run(capsys, script, '--help')
    assert code == 0 and not err
    assert 'usage' in out.lower()
    if script == 'train.py':
        assert "--learning_rate" in out and '= 0.0009' in out and 'max learning rate' in out
        assert '--penalty_coeff' in out and 'weight of mean(M^2/2) in the loss' in out
    if script == 'sample.py':
        assert '--top_k' in out and '= 200' in out and 'None: all' in out
    code, out, _ = run(capsys, script, '-h')
    assert code == 0 and 'usage' in out.lower()


@pytest.mark.slow
def test_ids_check_names_the_largest_id(capsys, bad_data):
    data = np.memmap(os.path.join(bad_data, 'big_ids', 'train.bin'), dtype=np.uint16, mode='r')
    code, _, err = run(capsys, 'train.py', f'--data_dir={bad_data}', '--dataset=big_ids')
    assert f'token id {int(data.max())}' in err


# ---------------------------------------------------------------------------- nothing of the user's damaged

@pytest.mark.slow
def test_overwrite_deletes_nothing_before_everything_is_checked(capsys, data_dir, tiny_run, tmp_path):
    """--overwrite=True with a configuration that cannot build its model, data that is not there, or a
    step that cannot fit in memory fails before deleting the run."""
    d = tmp_path / 'run'
    shutil.copytree(tiny_run, d)
    before = {f: (d / f).read_bytes() for f in ('ckpt.pt', 'best.pt', 'metrics.jsonl', 'config.json')}
    base = ['--dataset=wiki_sample', f'--data_dir={data_dir}', f'--out_dir={d}', '--n_layer=1', '--n_embd=16',
            '--n_head=1', '--block_size=16', '--compile=False', '--overwrite=True']
    for extra, fragment in ((['--n_head=3'], 'n_embd (16) must be divisible by n_head (3)'),
                            ([f'--data_dir={tmp_path}/nothing', '--dataset=mine'], 'no prepared data'),
                            (['--batch_size=40000000'], 'needs at least about')):
        code, _, err = run(capsys, 'train.py', *base, *extra)
        assert code != 0 and fragment in err, err
        assert all((d / f).read_bytes() == b for f, b in before.items()), extra


def test_a_symlinked_lock_is_not_followed(tmp_path):
    from runtime import RunLock, RuntimeSetupError
    precious = tmp_path / 'precious.txt'
    precious.write_text('the user\'s file')
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / '.lock').symlink_to(precious)
    with pytest.raises(RuntimeSetupError, match='is a symbolic link; remove it'):
        RunLock(str(tmp_path / 'run'))
    assert precious.read_text() == 'the user\'s file'


@pytest.mark.slow
def test_a_copied_best_pt_goes_on_with_resume_anyway(data_dir, tiny_run, tmp_path):
    """The documented way on from a best.pt (no optimizer state): --resume_anyway=True trains from its
    weights with a fresh optimizer, to the new max_iters."""
    run = tmp_path / 'run'
    shutil.copytree(tiny_run, run)
    shutil.copy(run / 'best.pt', run / 'ckpt.pt')
    args = RESUME.format(data=data_dir, runs=tmp_path).replace(f'--out_dir={tmp_path}/', f'--out_dir={tmp_path}/run')
    r = subprocess.run([sys.executable, os.path.join(HERE, 'train.py'), *args.split(), '--max_iters=4',
                        '--resume_anyway=True'], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    import torch
    assert torch.load(run / 'ckpt.pt', weights_only=True)['iter_num'] == 4


@pytest.mark.slow
def test_sample_into_a_closed_pipe_exits_quietly(tiny_run):
    """sample.py | head -n1: the reader goes away; no BrokenPipeError traceback."""
    r = subprocess.run(f"{shlex.quote(sys.executable)} {shlex.quote(os.path.join(HERE, 'sample.py'))} "
                       f"--out_dir={shlex.quote(tiny_run)} --num_samples=50 --max_new_tokens=200 | head -n1",
                       shell=True, capture_output=True, text=True, timeout=240, executable='/bin/bash')
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 1
    assert 'Traceback' not in r.stderr and 'BrokenPipe' not in r.stderr, r.stderr


def test_plot_skips_empty_and_null_metrics_lines(tiny_run, tmp_path, capsys):
    """plot.py on a metrics file with {} and null lines: they are left out; the charts are drawn."""
    folder = tmp_path / 'run'
    shutil.copytree(tiny_run, folder)
    with open(folder / 'metrics.jsonl', 'a') as f:
        f.write('{}\nnull\n')
    code, _, err = run(capsys, 'plot.py', folder, f'--out={tmp_path}')
    assert code == 0 and 'Traceback' not in err and (tmp_path / 'curves.png').stat().st_size > 0


def test_a_full_disk_while_appending_metrics_keeps_the_earlier_lines(tmp_path, monkeypatch):
    """metrics.jsonl on a full disk: the half-written line is undone, one line says so."""
    import errno
    import runtime
    path = tmp_path / 'metrics.jsonl'
    runtime.append_json_line({'iter': 0, 'loss': 1.0}, str(path))
    before = path.read_bytes()
    real_write = os.write

    def full(fd, data):  # a few bytes go in, then the disk is full
        if len(data) > 8:
            real_write(fd, data[:8])
            return 8
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(os, 'write', full)
    with pytest.raises(runtime.RuntimeSetupError, match='no space left on device while appending to .*earlier lines are intact'):
        runtime.append_json_line({'iter': 1, 'loss': 0.5}, str(path))
    monkeypatch.setattr(os, 'write', real_write)
    assert path.read_bytes() == before


def test_empty_and_null_metrics_lines_are_left_out_on_resume(tmp_path):
    """A resumed run's metrics.jsonl with {} and null lines (an edited file): left out with a warning."""
    import runtime
    path = tmp_path / 'metrics.jsonl'
    path.write_text('{"iter": 0, "loss": 2.0}\n{}\nnull\n{"iter": 1, "loss": 1.5}\n{"iter": 3, "loss": 1.0}\n')
    warnings = []
    runtime.trim_metrics(str(path), 2, -1, warn=warnings.append)
    assert [json.loads(x)['iter'] for x in path.read_text().splitlines()] == [0, 1]
    assert any('left out 2 line(s)' in w for w in warnings)


def test_plot_on_a_full_disk_keeps_the_previous_chart(tiny_run, tmp_path, monkeypatch, capsys):
    import errno
    import matplotlib.figure
    code, _, _ = run(capsys, 'plot.py', tiny_run, f'--out={tmp_path}')
    before = (tmp_path / 'curves.png').read_bytes()

    def full(self, fname, **kw):
        with open(fname, 'wb') as f:
            f.write(b'\x89PNG partial')
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(matplotlib.figure.Figure, 'savefig', full)
    code, _, err = run(capsys, 'plot.py', tiny_run, f'--out={tmp_path}')
    assert code == 1 and 'no space left on device while writing' in err and 'the previous chart is intact' in err
    assert len(err.strip().splitlines()) == 1 and (tmp_path / 'curves.png').read_bytes() == before
    assert not [f for f in os.listdir(tmp_path) if f.endswith('.tmp')]
