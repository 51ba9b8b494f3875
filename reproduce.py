"""
A reduced-scale reproduction of the seed's results table (METHOD.md section 6) on the embedded
Wikipedia sample, every row with several seeds, on a CPU.

$ python reproduce.py                      # the whole sweep (resumable: finished runs are skipped)
$ python reproduce.py --report_only=True   # only rebuild the table and charts from finished runs

Each row trains with its own seed config (config/learned_shift0.py, ..., config/baseline_dropout0.4.py),
so penalty, shift_init and dropout are exactly the seed's; only the scale is overridden below. As in the
seed, the learned model is narrower so both have about the same parameter count, and the training set
is small enough for many passes, the overfitting regime where a regulariser can show anything.
The subset is re-encoded to its most frequent GPT-2 ids plus one 'other' id: with all 50257 ids a
model this small is mostly embedding table (the LM head would be ~95% of its compute, not the seed's
~half) and learns to memorise rare tokens rather than language.
Finished runs' metrics go to results/repro/<run>/ (tracked in git), the table to results/repro/results.md
and .csv, the charts to results/repro/*.png.
"""

import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

from configurator import ConfigError, configure
from tokenizer import reduced_id_map

HERE = os.path.dirname(os.path.abspath(__file__))
ROWS = ['learned_shift0', 'learned_no_penalty', 'learned_shift_pi2', 'learned_shift_pi',
        'baseline', 'baseline_dropout0.2', 'baseline_dropout0.3', 'baseline_dropout0.4']
# the seed's reported train / val cross-entropy and keep fraction (METHOD.md section 6, The seed experiments)
SEED_RESULTS = {'learned_shift0': (2.937, 3.384, 0.6167), 'learned_no_penalty': (2.911, 3.403, 0.9609),
                'learned_shift_pi2': (2.967, 3.405, 0.5955), 'learned_shift_pi': (3.055, 3.457, 0.2507),
                'baseline': (2.845, 3.475, None), 'baseline_dropout0.2': (3.1, 3.354, None),
                'baseline_dropout0.3': (3.213, 3.425, None), 'baseline_dropout0.4': (3.319, 3.512, None)}
# -----------------------------------------------------------------------------
rows = ','.join(ROWS)  # which rows to run
seeds = '1337,1338,1339'  # one run per seed and row
max_iters = 1000  # optimizer steps per run: 2.05M tokens, about 20 passes over the training subset
train_tokens = 100000  # size of the training subset (cut after a whole document)
vocab_size = 8192  # > 0: keep the vocab_size - 1 most frequent GPT-2 ids of the subset, the rest become one id
data_dir = 'data'  # wiki_sample is prepared here if missing; the subset goes to data_dir/wiki_repro
out_root = 'out/repro'  # run folders (checkpoints)
results_dir = 'results/repro'  # finished runs' metrics, the table and the charts (commit these)
report_only = False  # skip training, rebuild the table and charts
# the scale: the seed's 26 layers x 144 (9 heads of 16) learned / x 156 (12 heads of 13) baseline
# at context 200 becomes 6 layers x 96 (6 heads of 16) / x 104 (8 heads of 13) at context 128
learned_shape = 'n_layer=6,n_embd=96,n_head=6'
baseline_shape = 'n_layer=6,n_embd=104,n_head=8'
train_args = ('block_size=128,batch_size=16,gradient_accumulation_steps=1,learning_rate=2e-3,min_lr=2e-4,'
              'warmup_iters=30,eval_interval=100,eval_iters=20,log_interval=10')
# -----------------------------------------------------------------------------


def prepare_subset():
    """data_dir/wiki_repro: the first train_tokens tokens of wiki_sample's train split (cut after a
    whole document) and its whole val split. With vocab_size > 0, both are re-encoded to the
    vocab_size - 1 most frequent GPT-2 ids of the training subset (new id = frequency rank) plus
    one id for every other token; gpt2_ids.npy maps the new ids back."""
    src = os.path.join(data_dir, 'wiki_sample')
    dst = os.path.join(data_dir, 'wiki_repro')
    if not os.path.exists(os.path.join(src, 'meta.json')):
        import prepare_wiki
        prepare_wiki.main(['--source=sample', f'--data_dir={data_dir}'])
    meta_path = os.path.join(dst, 'meta.json')
    recipe = {'train_tokens': train_tokens, 'vocab_size': vocab_size}
    if os.path.exists(meta_path) and json.load(open(meta_path)).get('subset') == recipe:
        return
    with open(os.path.join(src, 'meta.json')) as f:
        meta = json.load(f)
    train = np.memmap(os.path.join(src, 'train.bin'), dtype=np.uint16, mode='r')
    val = np.memmap(os.path.join(src, 'val.bin'), dtype=np.uint16, mode='r')
    ends = np.flatnonzero(train[:train_tokens] == meta['eot_token'])
    if len(ends) == 0:
        sys.exit(f"reproduce.py: error: train_tokens={train_tokens} holds no whole document; raise it")
    train = np.asarray(train[:ends[-1] + 1])
    val = np.asarray(val)
    meta.update(train_tokens=len(train), train_docs=len(ends), subset=recipe,
                source_detail=f"first {len(ends)} documents of wiki_sample's train split")
    os.makedirs(dst, exist_ok=True)
    if os.path.exists(meta_path):
        os.remove(meta_path)
    ids_path = os.path.join(dst, 'gpt2_ids.npy')
    if os.path.exists(ids_path):
        os.remove(ids_path)
    if vocab_size:
        counts = np.bincount(train, minlength=meta['vocab_size'])
        gpt2_ids = np.argsort(-counts, kind='stable')[:vocab_size - 1]  # most frequent first
        new_id = reduced_id_map(gpt2_ids, meta['vocab_size'])  # the rest -> vocab_size - 1, the 'other' id
        train, val = new_id[train], new_id[val]
        np.save(ids_path, gpt2_ids)
        meta.update(vocab_size=vocab_size, eot_token=int(new_id[meta['eot_token']]),
                    tokenizer=meta['tokenizer'] + f'; re-encoded to the {vocab_size - 1} most frequent ids of '
                    f'the training subset + 1 other ({(train < vocab_size - 1).mean():.1%} of training tokens kept)')
    for name, arr in (('train.bin', train), ('val.bin', val)):
        arr.astype(np.uint16).tofile(os.path.join(dst, name + '.tmp'))
        os.replace(os.path.join(dst, name + '.tmp'), os.path.join(dst, name))
    with open(meta_path + '.tmp', 'w') as f:
        json.dump(meta, f, indent=1)
    os.replace(meta_path + '.tmp', meta_path)


def finished(run):
    """The run's final evaluation (the record at max_iters), or None if it has not finished."""
    path = os.path.join(results_dir, run, 'metrics.jsonl')
    if not os.path.exists(path):
        return None
    with open(path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return next((r for r in recs if 'val/loss' in r and r['iter'] == max_iters), None)


def run_one(row, seed):
    run = f'{row}_s{seed}'
    out_dir = os.path.join(out_root, run)
    shape = learned_shape if row.startswith('learned') else baseline_shape
    resume = os.path.exists(os.path.join(out_dir, 'ckpt.pt'))
    cmd = [sys.executable, os.path.join(HERE, 'train.py'), os.path.join(HERE, 'config', f'{row}.py'),
           f'--out_dir={out_dir}', f'--data_dir={data_dir}', '--dataset=wiki_repro', f'--seed={seed}',
           f'--max_iters={max_iters}', f'--lr_decay_iters={27 * max_iters}', f'--wandb_run_name={row}',
           '--compile=False', '--init_from=resume' if resume else '--init_from=scratch', '--overwrite=True']
    cmd += [f'--{kv}' for kv in f'{shape},{train_args}'.split(',')]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"reproduce.py: error: {run} failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    dst = os.path.join(results_dir, run)
    os.makedirs(dst, exist_ok=True)
    for f in ('metrics.jsonl', 'config.json'):
        shutil.copy(os.path.join(out_dir, f), os.path.join(dst, f + '.tmp'))
        os.replace(os.path.join(dst, f + '.tmp'), os.path.join(dst, f))
    print(f"{run}: done in {time.time() - t0:.0f} s{' (resumed)' if resume else ''}", flush=True)


def summarize(row, seed_list):
    """Per-run final numbers of a row, for the runs that finished."""
    out = []
    for seed in seed_list:
        run = f'{row}_s{seed}'
        final = finished(run)
        if final is None:
            continue
        with open(os.path.join(results_dir, run, 'metrics.jsonl')) as f:
            recs = [json.loads(line) for line in f if line.strip()]
        steps = [r for r in recs if 'loss' in r]
        with open(os.path.join(results_dir, run, 'config.json')) as f:
            conf = json.load(f)
        last = steps[-max(1, len(steps) // 10):]  # the last 10% of logged steps
        out.append({'seed': seed, 'train': final['train/loss'], 'val': final['val/loss'],
                    'best_val': min(r['val/loss'] for r in recs if 'val/loss' in r),
                    'keep': statistics.mean(r['keep'] for r in last) if 'keep' in steps[-1] else None,
                    'val_keep': final.get('val/keep'), 'params': conf['num_params'],
                    'ms': statistics.median(r['ms_per_iter'] for r in steps[1:] or steps)})
    return out


def mean_std(values, digits=3, signed=False):
    values = [v for v in values if v is not None]
    if not values:
        return '-'
    mean = f'{statistics.mean(values):{"+" if signed else ""}.{digits}f}'
    return mean if len(values) == 1 else f'{mean} ± {statistics.stdev(values):.{digits}f}'


def report(seed_list):
    header = ['run', 'seeds', 'params', 'train CE', 'val CE', 'best val CE', 'Δ val vs baseline', 'Δ best val',
              'keep (train)', 'keep (val, eval)', 'ms/step', 'seed train', 'seed val', 'seed keep']
    table, csv_rows = [], []
    baseline = {r['seed']: r for r in summarize('baseline', seed_list)}
    for row in ROWS:
        runs = summarize(row, seed_list)
        st, sv, sk = SEED_RESULTS[row]
        if not runs:
            continue
        # paired by seed: runs of one seed share the data order's luck (e.g. when they leave the
        # early plateau), which the spread across seeds mixes in
        paired = [(r, baseline[r['seed']]) for r in runs if r['seed'] in baseline and row != 'baseline']
        table.append([row, str(len(runs)), f"{runs[0]['params']:,}", mean_std([r['train'] for r in runs]),
                      mean_std([r['val'] for r in runs]), mean_std([r['best_val'] for r in runs]),
                      mean_std([r['val'] - b['val'] for r, b in paired], signed=True),
                      mean_std([r['best_val'] - b['best_val'] for r, b in paired], signed=True),
                      mean_std([r['keep'] for r in runs], 4), mean_std([r['val_keep'] for r in runs], 4),
                      f"{statistics.median(r['ms'] for r in runs):.0f}", f'{st}', f'{sv}', f'{sk}' if sk else '-'])
        for r in runs:
            csv_rows.append({'row': row, **r})
    os.makedirs(results_dir, exist_ok=True)
    md = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)] + ['| ' + ' | '.join(t) + ' |' for t in table]
    with open(os.path.join(results_dir, 'results.md'), 'w') as f:
        f.write('\n'.join(md) + '\n')
    with open(os.path.join(results_dir, 'results.csv'), 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=['row', 'seed', 'train', 'val', 'best_val', 'keep', 'val_keep', 'params', 'ms'])
        w.writeheader()
        w.writerows(csv_rows)
    print('\n'.join(md))
    first = [f'{row}_s{seed_list[0]}' for row in ROWS if finished(f'{row}_s{seed_list[0]}')]
    if first:
        import plot
        plot.main([os.path.join(results_dir, r) for r in first] + [f'--out={results_dir}'])


RULES = {
    'rows': (f"len(x) > 0 and set(x.split(',')) <= set({ROWS!r})", f"a comma-separated list of {', '.join(ROWS)}"),
    'seeds': ("all(s.strip().isdigit() for s in x.split(','))", "a comma-separated list of integers, e.g. 1337,1338"),
    'max_iters': 'x >= 1', 'train_tokens': 'x >= 1',
    'vocab_size': ('x == 0 or 2 <= x <= 50257', "0 (GPT-2's 50257 ids) or 2..50257"),
}


def main():
    try:
        globals().update(configure({k: globals()[k] for k in (
            'rows', 'seeds', 'max_iters', 'train_tokens', 'vocab_size', 'data_dir', 'out_root', 'results_dir', 'report_only',
            'learned_shape', 'baseline_shape', 'train_args')}, sys.argv[1:], __file__, __doc__, RULES))
    except ConfigError as e:
        sys.exit(f"reproduce.py: error: {e}")
    row_list = rows.split(',')
    seed_list = [int(s) for s in seeds.split(',')]
    if report_only and not any(finished(f'{row}_s{seed}') for row in ROWS for seed in seed_list):
        sys.exit(f"reproduce.py: error: no finished runs in {results_dir} for seeds {seeds}; run the sweep first "
                 f"(python reproduce.py) or point --results_dir at its results")
    if not report_only:
        prepare_subset()
        t0 = time.time()
        for seed in seed_list:  # seed-major: a partial sweep covers every row once first
            for row in row_list:
                if finished(f'{row}_s{seed}') is None:
                    run_one(row, seed)
        print(f"sweep time this invocation: {(time.time() - t0) / 60:.1f} min")
    report(seed_list)


if __name__ == '__main__':
    main()
