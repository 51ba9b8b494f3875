"""sample.py, plot.py, bench.py and reproduce.py on tiny trained checkpoints (CPU)."""

import json
import os
import re
import runpy
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

@pytest.mark.parametrize('model_type', ['learned', 'baseline'])
def test_sample_deterministic_for_a_seed(runs, capsys, model_type):
    args = [f'--out_dir={runs[model_type]}', '--num_samples=2', '--max_new_tokens=20', '--seed=7']
    code, out1, _ = sample(capsys, *args)
    assert code == 0 and f'{model_type} model' in out1 and 'tokens/s' in out1
    _, out2, _ = sample(capsys, *args)
    _, out3, _ = sample(capsys, *args[:-1], '--seed=8')
    assert texts(out1) == texts(out2)
    assert texts(out1) != texts(out3)
    assert len(texts(out1)) == 2


def test_sample_stochastic_masks_change_outputs(runs, capsys):
    args = [f'--out_dir={runs["learned"]}', '--num_samples=1', '--max_new_tokens=30', '--temperature=0.5']
    _, det, _ = sample(capsys, *args)
    _, sto, _ = sample(capsys, *args, '--mask=stochastic')
    assert texts(det) != texts(sto)
    code, _, err = sample(capsys, f'--out_dir={runs["baseline"]}', '--mask=stochastic')
    assert code != 0 and 'needs a learned model' in err


def test_sample_prompt_longer_than_block_size(runs, capsys, tmp_path):
    prompt = tmp_path / 'prompt.txt'
    prompt.write_text('The history of the city ' * 20)  # 100 tokens, block_size is 32
    code, out, err = sample(capsys, f'--out_dir={runs["learned"]}', f'--start=FILE:{prompt}', '--num_samples=1',
                            '--max_new_tokens=5')
    assert code == 0 and 'more than block_size=32' in err
    assert texts(out)[0].startswith('The history of the city')


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


def test_plot_curves_and_layer_heatmap(runs, tmp_path):
    plot.main([runs['learned'], runs['baseline'], f'--out={tmp_path}'])
    for ext in ('png', 'svg'):
        assert nonempty_image(tmp_path / f'curves.{ext}')
    name = json.load(open(os.path.join(runs['learned'], 'config.json')))['wandb_run_name']
    assert nonempty_image(tmp_path / f'keep_layers_{name}.png')
    svg = (tmp_path / 'curves.svg').read_text()
    assert 'learned' in svg and 'baseline' in svg  # one legend entry per run


def test_plot_masks_from_checkpoint(runs, tmp_path):
    plot.main([runs['learned'], f'--out={tmp_path}', '--mask_text=The Moon orbits the Earth.'])
    name = os.path.basename(runs['learned'])
    assert nonempty_image(tmp_path / f'masks_{name}.png')
    tokens, keep = plot.token_layer_keep(runs['learned'], 'The Moon orbits the Earth.', 'ckpt.pt')
    assert keep.shape == (2, len(tokens)) and ((keep >= 0) & (keep <= 1)).all()


def test_plot_bad_input(runs, tmp_path):
    with pytest.raises(SystemExit, match='no metrics file'):
        plot.main([str(tmp_path), f'--out={tmp_path}'])
    with pytest.raises(SystemExit, match='mask charts need a learned model'):
        plot.main([runs['baseline'], f'--out={tmp_path}', '--mask_text=hello'])


# ---------------------------------------------------------------------------- bench.py, reproduce.py

def test_bench_smoke():
    r = subprocess.run([sys.executable, os.path.join(HERE, 'bench.py'), '--shapes=quick', '--modes=eager',
                        '--dtype=float32,bfloat16', '--batch_size=1', '--steps=1', '--rounds=1', '--gen_tokens=4',
                        '--gen_prompts=1,4'], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for dt in ('float32', 'bfloat16'):
        for kind in ('learned', 'baseline'):
            row = next(line for line in lines if line.startswith(f'eager     {dt:9} {kind} '))
            assert float(row.split()[7]) > 100  # peak MiB of a fresh process running the step
    assert 'speed-up' in r.stdout
    summary = lines[-1]
    assert summary.startswith('summary: step time vs baseline quick/eager/float32 learned ')
    assert 'FLOP ratio quick learned' in summary and 'KV-cache generation speed-up quick prompt 1' in summary
    assert 'dtype speed-up quick/eager learned bfloat16' in summary


def test_reproduce_smoke(data_dir, tmp_path):
    args = [sys.executable, os.path.join(HERE, 'reproduce.py'), '--rows=learned_shift0,baseline', '--seeds=1,2',
            '--max_iters=2', '--train_tokens=3000', '--vocab_size=300', f'--data_dir={data_dir}',
            f'--out_root={tmp_path / "out"}',
            f'--results_dir={tmp_path / "res"}', '--learned_shape=n_layer=1,n_embd=16,n_head=2',
            '--baseline_shape=n_layer=1,n_embd=16,n_head=2',
            '--train_args=block_size=16,batch_size=2,eval_interval=1,eval_iters=1,log_interval=1,warmup_iters=1']
    r = subprocess.run(args, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(': done in') == 4
    table = (tmp_path / 'res' / 'results.md').read_text().splitlines()
    assert table[2].startswith('| learned_shift0 | 2 |') and table[3].startswith('| baseline | 2 |')
    assert '±' in table[2]  # mean and standard deviation over the seeds
    csv_lines = (tmp_path / 'res' / 'results.csv').read_text().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith('row,seed,train,val,best_val,keep')
    assert nonempty_image(tmp_path / 'res' / 'curves.png')
    # the subset, re-encoded: ids < 300, the 299 kept ids map back to the source tokens, the rest is id 299
    repro = os.path.join(data_dir, 'wiki_repro')
    meta = json.load(open(os.path.join(repro, 'meta.json')))
    assert meta['train_tokens'] <= 3000 and meta['vocab_size'] == 300
    sub = np.fromfile(os.path.join(repro, 'train.bin'), dtype=np.uint16)
    src = np.fromfile(os.path.join(data_dir, 'wiki_sample', 'train.bin'), dtype=np.uint16)[:len(sub)]
    gpt2_ids = np.load(os.path.join(repro, 'gpt2_ids.npy'))
    kept = sub < 299
    assert sub.max() == 299 and 0.5 < kept.mean() < 1
    assert np.array_equal(gpt2_ids[sub[kept]], src[kept]) and not np.isin(src[~kept], gpt2_ids).any()
    assert sub[-1] == meta['eot_token'] and src[-1] == 50256
    config = json.load(open(tmp_path / 'res' / 'learned_shift0_s1' / 'config.json'))
    assert config['vocab_size'] == 300
    # the checkpoint carries the id map, so sample.py encodes the prompt and decodes GPT-2 text
    ckpt = torch.load(tmp_path / 'out' / 'learned_shift0_s1' / 'ckpt.pt', weights_only=True)
    assert torch.equal(ckpt['gpt2_ids'], torch.from_numpy(gpt2_ids.astype(np.int64)))
    s = subprocess.run([sys.executable, os.path.join(HERE, 'sample.py'), f'--out_dir={tmp_path / "out" / "learned_shift0_s1"}',
                        '--start=<|endoftext|>The', '--num_samples=1', '--max_new_tokens=8'],
                       capture_output=True, text=True, timeout=120)
    assert s.returncode == 0, s.stderr
    assert s.stdout.startswith('==== sample 1/1 ====\n[new document]\nThe') and 'tokens/s' in s.stdout
    r = subprocess.run(args, capture_output=True, text=True, timeout=240)  # resumable: nothing left to run
    assert r.returncode == 0 and ': done in' not in r.stdout
