"""
Reproduction v2: a powered study of the seed's table (METHOD.md section 6) and of the variants, in the
seed's regime (the no-dropout baseline overfits and dropout 0.2 ends below it), on a CPU.

$ python reproduce.py --calibrate=True --jobs=2   # the calibration pilot: results/study/calibration.md
$ python reproduce.py --jobs=2 --commit=True      # the sweep on 2 cores; resumable run by run (stop it at any
                                                  # time, run it again); every finished run is committed
$ python reproduce.py --report_only=True          # rebuild the tables and charts from results/study/
On a GPU, add device=cuda to --train_args, and another --results_dir.

Design. Every row trains with its own config file (config/<row>.py: penalty, shift_init, dropout, experts,
mask variant are that row's); only the scale is overridden, here and nowhere else:
- data: the embedded Wikipedia sample (prepare_wiki.py --source=sample), re-tokenized with GPT-2's BPE cut
  to its first vocab_size - 1 ranks plus <|endoftext|> (tokenizer.get_gpt2_cut: no "other" bucket, ids are
  GPT-2's); train = the first documents of its train split up to train_tokens tokens (cut after a whole
  document), val = its whole val split. In data_dir/study_v<vocab_size>_t<train_tokens>.
- models: a config at the seed's learned width (144: the learned rows and baseline_narrow) trains at
  learned_shape, every other (baseline, dropout and MoE rows) at baseline_shape; narrower learned as in the
  seed so that total parameters agree within 1% (printed at start). baseline_narrow, a plain GPT as wide
  as the learned model (a control added after the first results), separates the masks from the narrower
  residual stream. MoE rows keep their config's expert count and top-k, and a config's explicit
  expert_hidden (moe_flops: a full-width 4C expert) scales with the width.
- training: train_args and max_iters; the seed's near-constant learning-rate shape (linear warm-up, then a
  cosine to learning_rate / 10 over max_iters * 700000 / 26000 steps, as the seed's 700k over 26k).
- seeds: seed0, seed0 + 1, ...; one seed gives every row the same training windows in the same order and
  every evaluation covers the same windows (eval_windows='all'), so rows are compared paired by seed.
  Order: min_seeds seeds of the priority rows (PRIORITY, seed-major), then min_seeds_other of the others,
  then seeds are added to any comparison whose paired 95% interval on the primary endpoint is wider than
  +-target_ci, until it is narrower or has max_seeds (this data-dependent stopping makes the intervals
  slightly optimistic; the fixed-seed part is not affected).

Endpoints, declared before any run (cross-entropy in nats, eval mode, on deterministic non-overlapping
windows: the whole val split; the train split capped at val's number of windows, spread over it):
- primary: val CE averaged over the last three evaluations;
- secondary: best val CE (lowest evaluation); fit-matched val: for a row and its reference of the same
  seed, tau = the higher of their two final train CEs (the worse fit, which both runs reach); each run's
  val is interpolated linearly in train CE at the last time its train CE crossed tau (between two
  evaluations), and the difference row - reference is reported; final train CE;
- mask rows: keep fraction of the training masks (mean over the last 10% of logged steps) and of the eval
  masks (last evaluation), and whether it settled: the eval keep fraction moved by less than 0.02 between
  the evaluation at 3/4 of the run and the last;
- MoE rows: expert load entropy (nats, training, last 10% of logged steps; ln of the expert count is uniform);
- cost: parameters total and active per token, training FLOPs per token, measured ms per step (median).
Statistics: for each row against baseline and against baseline_dropout0.2, paired by seed: mean difference,
95% t-interval, number of seeds, two-sided p; the primary endpoint's comparisons are Holm-corrected
together (family-wise 5%); secondary differences get uncorrected intervals. A second table puts every
other row against learned_shift0 (initialisation, penalty, MoE, higher dropout, mask variants, width), the
same statistics Holm-corrected as a family of their own; it does not decide how many seeds a row gets.

Runs train in out_root/<row>_s<seed>/ (checkpoints; an interrupted run resumes from its ckpt.pt); a finished
run's metrics.jsonl and config.json are copied to results_dir/<row>_s<seed>/ (no checkpoints in results).
The tables go to results_dir/results.md and .csv, the charts (mean +- SD over seeds) to results_dir/*.png.
"""

import csv
import functools
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

import numpy as np

from configurator import ConfigError, configure
from runtime import model_module

HERE = os.path.dirname(os.path.abspath(__file__))
SEED_ROWS = ['learned_shift0', 'learned_no_penalty', 'learned_shift_pi2', 'learned_shift_pi',
             'baseline', 'baseline_dropout0.2', 'baseline_dropout0.3', 'baseline_dropout0.4']
ROWS = SEED_ROWS + ['moe_params', 'moe_flops', 'learned_precomputed', 'learned_soft', 'learned_fourier',
                    'baseline_narrow']
PRIORITY = ['baseline', 'baseline_dropout0.2', 'learned_shift0', 'learned_no_penalty', 'moe_params', 'learned_soft',
            'baseline_narrow']
REFS = ['baseline', 'baseline_dropout0.2']  # every row is compared with these (the declared family)
METHOD_REF = 'learned_shift0'  # the write-up's method: the other rows against it in a second family
SEED_RESULTS = {  # the seed's reported train / val cross-entropy and keep fraction (METHOD.md section 6)
                'learned_shift0': (2.937, 3.384, 0.6167), 'learned_no_penalty': (2.911, 3.403, 0.9609),
                'learned_shift_pi2': (2.967, 3.405, 0.5955), 'learned_shift_pi': (3.055, 3.457, 0.2507),
                'baseline': (2.845, 3.475, None), 'baseline_dropout0.2': (3.1, 3.354, None),
                'baseline_dropout0.3': (3.213, 3.425, None), 'baseline_dropout0.4': (3.319, 3.512, None)}
LEARNED_WIDTH = 144  # the seed's learned width (config files): such a config trains at learned_shape
# -----------------------------------------------------------------------------
rows = ','.join(ROWS)  # which rows to run (config/<row>.py each)
seed0 = 1337  # seeds are seed0, seed0 + 1, ...
min_seeds = 5  # seeds of every priority row (run first, seed-major)
min_seeds_other = 5  # seeds of every other row (3 can meet target_ci; 5 also tightens the rows against learned_shift0)
max_seeds = 8  # seeds are added to a comparison until its interval is within +-target_ci or it has this many
target_ci = 0.04  # half-width (nats) of the paired 95% interval of the primary endpoint to reach
max_iters = 2000  # optimizer steps per run
train_tokens = 150000  # size of the training subset, in tokens of the cut tokenizer (cut after a whole document)
val_tokens = 0  # 0: the whole val split; > 0: its first documents up to this many tokens (tests)
vocab_size = 2048  # GPT-2's first vocab_size - 1 ranks + <|endoftext|>
learning_rate = 2e-3  # shared by every row (calibrated); min_lr is a tenth of it
learned_shape = 'n_layer=4,n_embd=48,n_head=3'  # 144-wide configs (learned rows, baseline_narrow): 3 heads of 16 (seed: 9)
baseline_shape = 'n_layer=4,n_embd=52,n_head=4'  # the other configs (baseline, MoE rows): 4 heads of 13 (seed: 12)
train_args = ('block_size=128,batch_size=32,gradient_accumulation_steps=1,warmup_iters=300,'  # other train.py settings
              'eval_interval=200,eval_windows=all,log_interval=20,compile=True,dtype=auto')
data_dir = 'data'  # wiki_sample is prepared here if missing; the study's data goes to data_dir/study_v*_t*
out_root = 'out/study'  # run folders (checkpoints)
results_dir = 'results/study'  # finished runs' metrics and config, the tables and the charts (commit these)
jobs = 1  # runs trained at once, each with cpu_count // jobs threads (BENCHMARK.md: what two jobs gain on 2 cores)
commit = False  # git-commit results_dir after every finished run (a sweep spread over days loses nothing)
report_only = False  # skip training, rebuild the tables and charts
calibrate = False  # run the calibration pilot instead of the sweep: results_dir/calibration.md
calib_tokens = '100000,150000,200000'  # pilot: train subset sizes, baseline and baseline_dropout0.2 at max_iters
calib_lrs = '1e-3,2e-3,4e-3'  # pilot: learning rates, baseline and learned_shift0 on calib_lr_tokens
calib_lr_tokens = 400000  # pilot: train subset of the learning-rate runs
calib_iters = 400  # pilot: steps of the learning-rate runs
# -----------------------------------------------------------------------------


def fail(message):
    sys.exit(f"reproduce.py: error: {message}")


def parse_kv(text):
    """'a=1,b=x' -> {'a': 1, 'b': 'x'} (values as configurator reads them)."""
    import ast
    out = {}
    for item in filter(None, text.split(',')):
        key, _, raw = item.partition('=')
        try:
            out[key] = ast.literal_eval(raw)
        except (SyntaxError, ValueError):
            out[key] = raw
    return out


def row_config(row):
    """The settings a config file makes (executed as configurator does)."""
    import types
    scope = {}
    with open(os.path.join(HERE, 'config', f'{row}.py')) as f:
        exec(compile(f.read(), f.name, 'exec'), {}, scope)
    return {k: v for k, v in scope.items() if not k.startswith('_') and not isinstance(v, types.ModuleType)}


# ----------------------------------------------------------------------------- data

def dataset_name(tokens=None):
    return f'study_v{vocab_size}_t{tokens or train_tokens}' + (f'_val{val_tokens}' if val_tokens else '')


def first_documents(ids, eot, limit):
    """ids cut after the last whole document within the first limit tokens."""
    ends = np.flatnonzero(ids[:limit] == eot)
    if len(ends) == 0:
        fail(f"the first {limit} tokens hold no whole document; raise train_tokens / val_tokens")
    return ids[:ends[-1] + 1]


def prepare_data(tokens=None):
    """data_dir/<dataset_name>: wiki_sample re-tokenized with GPT-2 cut to vocab_size - 1 ranks; train = its
    first documents up to `tokens` tokens, val = its whole val split (or val_tokens of it). Written to
    temporaries and renamed, meta.json (which records the recipe) last; redone only if the recipe changed."""
    from runtime import tmp_name
    from tokenizer import get_gpt2, get_gpt2_cut
    tokens = tokens or train_tokens
    src = os.path.join(data_dir, 'wiki_sample')
    dst = os.path.join(data_dir, dataset_name(tokens))
    if not os.path.exists(os.path.join(src, 'meta.json')):
        import prepare_wiki
        prepare_wiki.main(['--source=sample', f'--data_dir={data_dir}'])
    with open(os.path.join(src, 'meta.json')) as f:
        src_meta = json.load(f)
    recipe = {'source': src_meta['recipe'], 'tokenizer_cut': vocab_size - 1, 'train_tokens': tokens,
              'val_tokens': val_tokens}
    meta_path = os.path.join(dst, 'meta.json')
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            if json.load(f).get('subset') == recipe:
                return dst
    gpt2, cut = get_gpt2(), get_gpt2_cut(vocab_size - 1)
    eot = vocab_size - 1
    splits, docs = {}, {}
    for split, limit in (('train', tokens), ('val', val_tokens)):
        ids = np.fromfile(os.path.join(src, f'{split}.bin'), dtype=np.uint16)
        if limit:  # a GPT-2 token is one or more cut tokens: 4 * limit of them hold more than enough
            ids = first_documents(ids, src_meta['eot_token'], 4 * limit)
        # documents are separated by <|endoftext|>, which tiktoken splits at first: one call = per document
        text = gpt2.decode(ids.tolist())
        ids = np.array(cut.encode(text, allowed_special={'<|endoftext|>'}), dtype=np.uint16)
        if len(ids) < limit:  # the whole split is shorter
            fail(f"{split}: {limit:,} tokens asked for, but the sample's {split} split has only {len(ids):,}")
        splits[split] = first_documents(ids, eot, limit) if limit else ids
        docs[split] = int((splits[split] == eot).sum())
    meta = {'vocab_size': vocab_size, 'eot_token': eot, 'tokenizer_cut': vocab_size - 1, 'dtype': 'uint16',
            'train_tokens': len(splits['train']), 'val_tokens': len(splits['val']),
            'train_docs': docs['train'], 'val_docs': docs['val'], 'source': 'sample',
            'source_detail': f"the first {docs['train']} train documents and {docs['val']} val documents of "
                             f"{src}, re-tokenized", 'tokenizer': f'GPT-2 BPE cut to its first {vocab_size - 1} '
                             f'ranks + <|endoftext|> = {eot} (tokenizer.get_gpt2_cut)',
            'subset': recipe}
    os.makedirs(dst, exist_ok=True)
    if os.path.exists(meta_path):  # without meta.json the folder reads as incomplete while the bins change
        os.remove(meta_path)
    for split, arr in splits.items():
        path = os.path.join(dst, f'{split}.bin')
        arr.tofile(tmp_name(path))
        os.replace(tmp_name(path), path)
    with open(tmp_name(meta_path), 'w') as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp_name(meta_path), meta_path)
    print(f"wrote {dst}: train {meta['train_tokens']:,} tokens ({docs['train']:,} docs), "
          f"val {meta['val_tokens']:,} tokens ({docs['val']:,} docs), vocabulary {vocab_size}")
    return dst


# ----------------------------------------------------------------------------- runs

def run_settings(row, seed, iters=None, lr=None, tokens=None):
    """The train.py overrides of one run (on top of config/<row>.py)."""
    cfg = row_config(row)
    shape = parse_kv(learned_shape if cfg['n_embd'] == LEARNED_WIDTH else baseline_shape)
    if cfg.get('expert_hidden'):  # an explicit expert width scales with the model's
        shape['expert_hidden'] = cfg['expert_hidden'] * shape['n_embd'] // cfg['n_embd']
    iters, lr = iters or max_iters, lr or learning_rate
    return {**shape, **parse_kv(train_args), 'dataset': dataset_name(tokens), 'seed': seed, 'max_iters': iters,
            'learning_rate': lr, 'min_lr': lr / 10, 'lr_decay_iters': round(iters * 700000 / 26000)}


def read_records(path):
    from runtime import read_jsonl
    return read_jsonl(path, warn=lambda msg: print(msg, file=sys.stderr))


def final_eval(folder, iters):
    """The run's evaluation at iters (its end), or None."""
    path = os.path.join(folder, 'metrics.jsonl')
    if not os.path.exists(path):
        return None
    return next((r for r in read_records(path) if 'val/loss' in r and r['iter'] == iters), None)


def mismatch(dst, settings):
    """The first setting that dst's run was trained with differently, as 'key=theirs, this study has ours',
    or None. config.json holds what 'auto' chose (dtype, device); compiled or not, a run is the same
    experiment."""
    with open(os.path.join(dst, 'config.json')) as f:
        conf = json.load(f)
    for k, v in settings.items():
        if conf.get(k) != v and v != 'auto' and k != 'compile':
            return f"{k}={conf.get(k)!r}, this study has {k}={v!r}"
    return None


def finished(dst, settings):
    """True when dst holds a finished run of these settings; an error if it holds another design's run."""
    if final_eval(dst, settings['max_iters']) is None:
        return False
    other = mismatch(dst, settings)
    if other:
        fail(f"{dst} was trained with {other}: point --results_dir and --out_root elsewhere for a new design "
             f"(or remove the old runs)")
    return True


stop_signal = None


def start_run(name, row, settings, dst):
    """Start training (or resuming) out_root/name in a child process; its output goes to train.log."""
    out_dir = os.path.join(out_root, name)
    resume = os.path.exists(os.path.join(out_dir, 'ckpt.pt'))
    cmd = [sys.executable, os.path.join(HERE, 'train.py'), os.path.join(HERE, 'config', f'{row}.py'),
           f'--out_dir={out_dir}', f'--data_dir={data_dir}', f'--wandb_run_name={row}',
           '--init_from=resume' if resume else '--init_from=scratch', '--overwrite=True']
    cmd += [f'--{k}={v}' for k, v in settings.items()]
    env = dict(os.environ)
    if jobs > 1:  # share the cores: oversubscribed OpenMP threads spin-wait
        env['OMP_NUM_THREADS'] = str(max(1, (os.cpu_count() or 1) // jobs))
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.join(out_dir, 'train.log')
    with open(log_path, 'a') as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    return dict(name=name, out_dir=out_dir, settings=settings, dst=dst, child=child, log_path=log_path,
                resume=resume, t0=time.time())


def finish_run(run, code):
    """After a child exits: copy a finished run's metrics and config to its dst; the error of a failed one
    (None when it finished or was stopped by a signal)."""
    name, out_dir = run['name'], run['out_dir']
    stopped = code < 0 or code in (128 + signal.SIGINT, 128 + signal.SIGTERM)  # by the forwarded signal
    if code != 0 and not (stop_signal and stopped):  # stopped, not failed
        with open(run['log_path']) as f:
            last = [line.strip() for line in f if line.strip()][-1:]
        return f"{name} failed (exit {code}): {last[0] if last else '?'} (log: {run['log_path']})"
    if final_eval(out_dir, run['settings']['max_iters']) is None:
        return None if stop_signal else f"{name} ended before its last step (log: {run['log_path']})"
    from runtime import tmp_name
    os.makedirs(run['dst'], exist_ok=True)
    for f in ('metrics.jsonl', 'config.json'):
        shutil.copy(os.path.join(out_dir, f), tmp_name(os.path.join(run['dst'], f)))
        os.replace(tmp_name(os.path.join(run['dst'], f)), os.path.join(run['dst'], f))
    print(f"{name}: done in {time.time() - run['t0']:.0f} s{' (resumed)' if run['resume'] else ''}", flush=True)
    return None


def run_all(next_task, after_each):
    """Train the runs that next_task(names in flight) gives, `jobs` at a time, until it gives None; call
    after_each() when one has finished. SIGINT/SIGTERM stop every run (train.py saves a checkpoint) and the
    sweep; the same command resumes them. A failed run stops the others the same way."""
    global stop_signal
    running, error = [], None

    def forward(signum, frame):
        global stop_signal
        stop_signal = signal.Signals(signum).name
        for r in running:
            r['child'].send_signal(signum)
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    changed = True  # ask next_task again only when a run has ended (it reads every finished run)
    try:
        while True:
            while changed and not stop_signal and not error and len(running) < jobs:
                task = next_task({r['name'] for r in running})
                if task is None:
                    break
                running.append(start_run(*task))
            changed = False
            if not running:
                break
            time.sleep(0.5)
            for r in [r for r in running if r['child'].poll() is not None]:
                running.remove(r)
                changed = True
                err = finish_run(r, r['child'].returncode)
                if err and not error:
                    error = err
                    for other in running:
                        other['child'].send_signal(signal.SIGTERM)
                elif not err and not stop_signal:  # finish_run copied a finished run
                    after_each(r['name'])
    finally:
        for r in running:  # an error here must not leave runs training without their parent
            r['child'].send_signal(signal.SIGTERM)
            r['child'].wait()
        for s, h in old.items():
            signal.signal(s, h)
    if error:
        fail(error + ("; the other runs saved a checkpoint" if jobs > 1 else ''))
    if stop_signal:
        sys.exit(f"reproduce.py: stopped by {stop_signal}; the runs in flight saved a checkpoint: run the same "
                 f"command again to go on")


def git_commit(message):
    """Commit results_dir (and only it) to the git repository it lies in; retried while another git
    command holds a lock. A warning, not an error, when it cannot."""
    env = dict(os.environ, LC_ALL='C')
    git = lambda *a: subprocess.run(['git', *a], cwd=results_dir, capture_output=True, text=True, env=env)  # noqa: E731
    for _ in range(30):
        r = git('add', '--', '.')
        if r.returncode == 0:
            if git('diff', '--cached', '--quiet', '--', '.').returncode == 0:
                return  # nothing new
            r = git('commit', '-q', '-m', message, '--', '.')
            if r.returncode == 0:
                return
        if '.lock' not in r.stderr:
            break
        time.sleep(2)
    print(f"reproduce.py: warning: could not commit {results_dir}: {(r.stderr or r.stdout).strip()}", file=sys.stderr)


# ----------------------------------------------------------------------------- statistics

def t_cdf(t, df):
    """P(T <= t) for Student's t with df degrees of freedom (Simpson's rule on the density)."""
    x = abs(t)
    if math.isinf(x):
        return 1.0 if t > 0 else 0.0
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    pdf = lambda u: c * (1 + u * u / df) ** (-(df + 1) / 2)  # noqa: E731
    n = 2 * max(100, int(100 * x))  # even, fine enough for 1e-9 over [0, x]
    h = x / n
    area = pdf(0) + pdf(x) + sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, n))
    half = area * h / 3
    return 0.5 + half if t >= 0 else 0.5 - half


@functools.lru_cache(maxsize=None)
def t_quantile(p, df):
    """The t with P(T <= t) = p, by bisection (p in (0.5, 1))."""
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def paired(diffs):
    """Mean, SD, half-width of the 95% t-interval, n and two-sided p of paired differences; the
    spread fields are None with fewer than 2."""
    n = len(diffs)
    out = {'n': n, 'mean': statistics.mean(diffs) if diffs else None, 'sd': None, 'half': None, 'p': None}
    if n >= 2:
        sd = statistics.stdev(diffs)
        se = sd / math.sqrt(n)
        out.update(sd=sd, half=t_quantile(0.975, n - 1) * se,
                   p=(0.0 if out['mean'] else 1.0) if se == 0 else 2 * (1 - t_cdf(abs(out['mean']) / se, n - 1)))
    return out


def holm(pvalues, alpha=0.05):
    """{name: rejected} by Holm's step-down: the k-th smallest p (k = 1..m) is rejected when it is
    <= alpha / (m - k + 1) and every smaller one was."""
    order = sorted(pvalues, key=pvalues.get)
    out, going = {}, True
    for k, name in enumerate(order):
        going = going and pvalues[name] <= alpha / (len(order) - k)
        out[name] = going
    return out


# ----------------------------------------------------------------------------- endpoints

def endpoints(folder, iters):
    """The declared endpoints of one finished run (see the docstring)."""
    recs = read_records(os.path.join(folder, 'metrics.jsonl'))
    evals = sorted({r['iter']: r for r in recs if 'val/loss' in r}.values(), key=lambda r: r['iter'])
    steps = [r for r in recs if 'loss' in r]
    tail = steps[-max(1, len(steps) // 10):]
    with open(os.path.join(folder, 'config.json')) as f:
        conf = json.load(f)
    out = {'primary': statistics.mean(r['val/loss'] for r in evals[-3:]), 'best_val': min(r['val/loss'] for r in evals),
           'final_val': evals[-1]['val/loss'], 'final_train': evals[-1]['train/loss'],
           'curve': [(r['train/loss'], r['val/loss']) for r in evals],
           'ms': statistics.median([r['ms_per_iter'] for r in steps if 'ms_per_iter' in r] or [float('nan')]),
           'precision': f"{conf.get('dtype')}, {'compiled' if conf.get('compile') else 'eager'}",
           'keep_train': None, 'keep_eval': None, 'keep_change': None, 'settled': None, 'load_entropy': None,
           **cost(conf)}
    if 'keep' in steps[-1]:
        quarter = min(evals, key=lambda r: abs(r['iter'] - 0.75 * iters))
        out.update(keep_train=statistics.mean(r['keep'] for r in tail), keep_eval=evals[-1]['val/keep'],
                   keep_change=evals[-1]['val/keep'] - quarter['val/keep'])
        out['settled'] = abs(out['keep_change']) < 0.02
    if 'load_entropy' in steps[-1]:
        out['load_entropy'] = statistics.mean(r['load_entropy'] for r in tail)
    return out


def val_at_train(curve, tau):
    """Val CE at the last time the train CE crossed tau, interpolated linearly in train CE between the two
    evaluations around it; None if it never got down to tau."""
    for (t0, v0), (t1, v1) in zip(curve[-2::-1], curve[::-1]):  # (earlier, later) pairs, latest first
        if t1 <= tau <= t0:
            return v1 if t0 == t1 else v1 + (v0 - v1) * (tau - t1) / (t0 - t1)
    return None


def fit_matched(a, b):
    """Val of run a minus val of run b at the same train CE: tau = the higher final train CE of the two."""
    tau = max(a['final_train'], b['final_train'])
    va, vb = val_at_train(a['curve'], tau), val_at_train(b['curve'], tau)
    return None if va is None or vb is None else va - vb


def cost(conf):
    """Parameters (total, active per token) and training FLOPs per token of the run's model."""
    import dataclasses
    module = model_module(conf['model_type'])
    fields = {f.name: conf[f.name] for f in dataclasses.fields(module.GPTConfig) if f.name in conf}
    m = module.GPT(module.GPTConfig(**fields))
    total = m.get_num_params()
    active = m.get_num_active_params() if hasattr(m, 'get_num_active_params') else total
    return {'params': total, 'active': active, 'flops': m.flops_per_token()}


# ----------------------------------------------------------------------------- the sweep

def seed_of(k):
    return seed0 + k


def collect(row_list):
    """{row: {seed index: endpoints}} of the finished runs in results_dir."""
    out = {}
    for row in row_list:
        out[row] = {}
        for k in range(max(max_seeds, min_seeds, min_seeds_other)):
            settings = run_settings(row, seed_of(k))
            dst = os.path.join(results_dir, f'{row}_s{seed_of(k)}')
            if finished(dst, settings):
                out[row][k] = endpoints(dst, settings['max_iters'])
    return out


def comparisons(row_list):
    """(row, reference) pairs: every row against each reference, baseline_dropout0.2 against baseline once."""
    return [(row, ref) for ref in REFS if ref in row_list for row in row_list
            if row != ref and not (row in REFS and REFS.index(row) < REFS.index(ref))]


def method_comparisons(row_list):
    """(row, METHOD_REF) pairs of the second family: every row that is neither a reference nor the method."""
    return [(row, METHOD_REF) for row in row_list if METHOD_REF in row_list and row not in REFS + [METHOD_REF]]


def next_run(row_list, done, busy=()):
    """(seed index, row) to run next, or None when nothing is left to start: the fixed plan first, then
    the seeds that the open comparisons need (lowest seed first, then priority order); runs named in busy
    are in flight. Seed-major: a partial sweep has every row of a group at the same number of seeds, give
    or take one."""
    first, rest = [r for r in PRIORITY if r in row_list], [r for r in row_list if r not in PRIORITY]
    order = first + rest
    free = lambda k, row: k not in done[row] and f'{row}_s{seed_of(k)}' not in busy  # noqa: E731
    for group, n in ((first, min_seeds), (rest, min_seeds_other)):  # the priority rows' seeds first
        for k in range(n):
            for row in group:
                if free(k, row):
                    return k, row
    need = []
    for row, ref in comparisons(row_list):
        both = sorted(set(done[row]) & set(done[ref]))
        if len(both) >= max_seeds:
            continue
        s = paired([done[row][k]['primary'] - done[ref][k]['primary'] for k in both])
        if s['half'] is not None and s['half'] <= target_ci:
            continue
        k = min(set(range(max_seeds)) - set(both))
        need += [(k, order.index(r), r) for r in (row, ref) if free(k, r)]
    return min(need)[::2] if need else None


def sweep(row_list):
    t0, n = time.time(), 0

    def next_task(busy):
        nxt = next_run(row_list, collect(row_list), busy)
        if nxt is None:
            return None
        k, row = nxt
        name = f'{row}_s{seed_of(k)}'
        return name, row, run_settings(row, seed_of(k)), os.path.join(results_dir, name)

    def after_each(name):
        nonlocal n
        n += 1
        if commit:  # the tables as they stand (the charts at the end, or with --report_only)
            runs = sum(map(len, report(row_list, quiet=True).values()))
            git_commit(f"study: {name} finished ({runs} finished run{'s' if runs > 1 else ''})")
    run_all(next_task, after_each)
    print(f"sweep: {n} run(s) this invocation, {(time.time() - t0) / 60:.1f} min; the study is complete")


# ----------------------------------------------------------------------------- report

def fmt(x, digits=3, signed=False):
    return '-' if x is None else f"{x:{'+' if signed else ''}.{digits}f}"


def mean_sd(values, digits=3):
    values = [v for v in values if v is not None]
    if not values:
        return '-'
    return fmt(statistics.mean(values), digits) + (f' ± {statistics.stdev(values):.{digits}f}' if len(values) > 1 else '')


def interval(s, digits=3):
    if s['mean'] is None:
        return '-'
    if s['half'] is None:
        return f"{s['mean']:+.{digits}f} (n={s['n']})"
    return (f"{s['mean']:+.{digits}f} [{s['mean'] - s['half']:+.{digits}f}, {s['mean'] + s['half']:+.{digits}f}] "
            f"(n={s['n']})")


def design_table(row_list):
    """The seed's design next to this study's, as markdown lines."""
    ta = parse_kv(train_args)
    meta_path = os.path.join(results_dir, 'data.json')  # the study's data's meta.json, kept with the results
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
    n_train = meta.get('train_tokens', train_tokens)
    sizes = model_sizes()
    tok_step = ta['batch_size'] * ta.get('gradient_accumulation_steps', 1) * ta['block_size']
    lr = learning_rate
    return [
        '| | seed (METHOD.md §6) | this study |', '|---|---|---|',
        f"| parameters (learned / baseline) | 15,335,424 / 15,441,192 (26 layers × 144 / × 156) | "
        f"{sizes['learned']:,} / {sizes['baseline']:,} ({learned_shape} / {baseline_shape}; "
        f"{sizes['learned'] / sizes['baseline'] - 1:+.2%}) |",
        f"| train tokens | 38.3M | {n_train:,} (the first {meta.get('train_docs', '?')} documents of the embedded sample's "
        f"train split) |",
        f"| val tokens | 4.3M, 200 random batches per split | {meta.get('val_tokens', '?'):,} (the whole val split, every "
        f"window of {ta['block_size']}) |" if meta else "| val tokens | 4.3M | (data not prepared yet) |",
        f"| train tokens per parameter | 2.5 | {n_train / sizes['baseline']:.2f} |",
        f"| passes over the train split | 109 | {max_iters * tok_step / n_train:.3g} |",
        f"| steps | 26,000 | {max_iters:,} |",
        f"| batch (tokens per step) | 50 × 16 × 200 (160,000) | {ta['batch_size']} × "
        f"{ta.get('gradient_accumulation_steps', 1)} × {ta['block_size']} ({tok_step:,}) |",
        f"| learning rate | 9e-4, 300 warm-up steps, cosine to 9e-5 over 700k steps | {lr:g}, {ta['warmup_iters']} "
        f"warm-up steps, cosine to {lr / 10:g} over {round(max_iters * 700000 / 26000):,} steps |",
        f"| vocabulary | GPT-2, 50,257 | GPT-2 cut to its first {vocab_size - 1:,} ranks + <\\|endoftext\\|> ({vocab_size:,}) |",
        f"| evaluation | every 500 steps | every {ta['eval_interval']} steps |",
        f"| seeds | 1 per row | {min_seeds} (priority rows) / {min_seeds_other} (others), more up to {max_seeds} "
        f"until a paired 95% interval is within ±{target_ci} |",
    ]


def differences_table(done, pairs, csv_diffs):
    """Markdown lines of paired differences for (row, reference) pairs, their primary p-values Holm-corrected
    together; appends the csv records to csv_diffs."""
    stats = {}
    for row, ref in pairs:
        both = sorted(set(done[row]) & set(done[ref]))
        a, b = [done[row][k] for k in both], [done[ref][k] for k in both]
        fm = [fit_matched(x, y) for x, y in zip(a, b)]
        stats[row, ref] = {'primary': paired([x['primary'] - y['primary'] for x, y in zip(a, b)]),
                           'best_val': paired([x['best_val'] - y['best_val'] for x, y in zip(a, b)]),
                           'fit': paired([d for d in fm if d is not None]), 'fit_missing': fm.count(None),
                           'train': paired([x['final_train'] - y['final_train'] for x, y in zip(a, b)])}
    tested = {key: s['primary']['p'] for key, s in stats.items() if s['primary']['p'] is not None}
    rejected = holm(tested)
    head = ['row', 'vs', 'Δ primary [95% CI] (n)', 'p', f'Holm (5%, m={len(tested)})', 'Δ best val [95% CI]',
            'Δ val at equal train CE [95% CI]', 'Δ final train CE [95% CI]', 'seed Δ val']
    md = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for (row, ref), s in stats.items():
        seed_d = (SEED_RESULTS[row][1] - SEED_RESULTS[ref][1]) if row in SEED_RESULTS and ref in SEED_RESULTS else None
        verdict = '-' if (row, ref) not in rejected else ('distinguishable' if rejected[row, ref] else 'not distinguishable')
        fit = interval(s['fit']) + (f", {s['fit_missing']} seed(s) unmatched" if s['fit_missing'] else '')
        md.append('| ' + ' | '.join([row, ref, interval(s['primary']), fmt(s['primary']['p'], 4), verdict,
                                      interval(s['best_val']), fit, interval(s['train']), fmt(seed_d, 3, True)]) + ' |')
        for endpoint in ('primary', 'best_val', 'fit', 'train'):
            e = s[endpoint]
            csv_diffs.append({'row': row, 'reference': ref, 'endpoint': endpoint, 'n': e['n'], 'mean': e['mean'],
                              'sd': e['sd'], 'ci_low': None if e['half'] is None else e['mean'] - e['half'],
                              'ci_high': None if e['half'] is None else e['mean'] + e['half'], 'p': e['p'],
                              'holm_rejected': rejected.get((row, ref)) if endpoint == 'primary' else None})
    return md


def report(row_list, quiet=False):
    """results.md and .csv from the finished runs; the charts too unless quiet. Returns collect()'s
    {row: {seed index: endpoints}}."""
    done = collect(row_list)
    rows_done = [r for r in row_list if done[r]]
    if not rows_done:
        fail(f"no finished runs of this design in {results_dir}; run the sweep first (python reproduce.py) "
             f"or point --results_dir at its results")
    md = ['# Reproduction v2: results', '', '## Design', ''] + design_table(row_list)
    # per row
    head = ['row', 'seeds', 'params (active)', 'FLOPs/token', 'val CE, last 3 evals (primary)', 'best val CE',
            'final train CE', 'keep (train)', 'keep (eval)', 'keep settled', 'load entropy', 'ms/step',
            'seed train', 'seed val', 'seed keep']
    md += ['', '## Results (mean ± SD over seeds)', '', '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for row in rows_done:
        runs = list(done[row].values())
        r0 = runs[0]
        st, sv, sk = SEED_RESULTS.get(row, (None, None, None))
        settled = [r['settled'] for r in runs if r['settled'] is not None]
        md.append('| ' + ' | '.join([
            row, str(len(runs)), f"{r0['params']:,}" + (f" ({r0['active']:,})" if r0['active'] != r0['params'] else ''),
            f"{r0['flops'] / 1e6:.2f}M", mean_sd([r['primary'] for r in runs]), mean_sd([r['best_val'] for r in runs]),
            mean_sd([r['final_train'] for r in runs]), mean_sd([r['keep_train'] for r in runs], 4),
            mean_sd([r['keep_eval'] for r in runs], 4), f"{sum(settled)}/{len(settled)}" if settled else '-',
            mean_sd([r['load_entropy'] for r in runs]), f"{statistics.median(r['ms'] for r in runs):.0f}",
            fmt(st), fmt(sv), fmt(sk, 4)]) + ' |')
    # paired differences: the declared family (every row against the references), then the other rows
    # against the method itself (the claims on initialisation, penalty, MoE and the controls)
    csv_diffs = []
    md += ['', '## Paired differences (row − reference, same seed; nats)', '',
           'Primary comparisons are Holm-corrected together; "distinguishable" means the difference from zero '
           'survives the correction. Secondary columns: uncorrected 95% intervals.', '']
    md += differences_table(done, comparisons(rows_done), csv_diffs)
    against_method = method_comparisons(rows_done)
    if against_method:
        md += ['', f'## Against {METHOD_REF} (row − {METHOD_REF}, same seed; nats)', '',
               f'Every other row against the method: initialisation (shift π/2, π), the penalty, the MoE references, '
               f'the higher dropout rates, the mask variants and the width control. A second family, Holm-corrected '
               f'on its own; these pairs do not decide how many seeds a row gets.', '']
        md += differences_table(done, against_method, csv_diffs)
    os.makedirs(results_dir, exist_ok=True)
    from runtime import atomic_write

    def write_text(path, text):
        atomic_write(path, lambda tmp: open(tmp, 'w').write(text), os.path.basename(path))

    def write_csv(path, records):
        def write(tmp):
            with open(tmp, 'w', newline='') as f:
                w = csv.DictWriter(f, fieldnames=list(records[0]))
                w.writeheader()
                w.writerows(records)
        atomic_write(path, write, os.path.basename(path))
    write_text(os.path.join(results_dir, 'results.md'), '\n'.join(md) + '\n')
    per_run = [{'row': row, 'seed': seed_of(k), **{c: v for c, v in e.items() if c != 'curve'}}
               for row in rows_done for k, e in sorted(done[row].items())]
    write_csv(os.path.join(results_dir, 'results.csv'), per_run)
    if csv_diffs:
        write_csv(os.path.join(results_dir, 'differences.csv'), csv_diffs)
    if quiet:
        return done
    print('\n'.join(md))
    import plot
    folders = [os.path.join(results_dir, f'{row}_s{seed_of(k)}') for row in rows_done for k in sorted(done[row])]
    plot.main(folders + ['--bands', f'--out={results_dir}'])
    return done


# ----------------------------------------------------------------------------- calibration

def calibration():
    """The pilot, one seed: (1) learning rates, baseline and learned_shift0 at calib_iters steps on
    calib_lr_tokens; (2) train subset sizes, baseline and baseline_dropout0.2 at max_iters steps (with any
    earlier subset pilot of this learning rate found in results_dir/calibration). calibration.md is
    rewritten after every run, so a pilot stopped half way shows what it has; run again to go on."""
    plan = [('lr', row, calib_lr_tokens, calib_iters, float(lr)) for lr in calib_lrs.split(',')
            for row in ('baseline', 'learned_shift0')]
    plan += [('subset', row, int(t), max_iters, learning_rate) for t in calib_tokens.split(',')
             for row in ('baseline', 'baseline_dropout0.2')]
    tasks = {}
    for part, row, tokens, iters, lr in plan:
        prepare_data(tokens)
        name = os.path.join('calibration', f'{row}_t{tokens}_i{iters}_lr{lr:g}')
        tasks[name] = (part, row, tokens, lr, run_settings(row, seed0, iters=iters, lr=lr, tokens=tokens))

    def next_task(busy):
        return next(((name, t[1], t[4], os.path.join(results_dir, name)) for name, t in tasks.items()
                     if name not in busy and not finished(os.path.join(results_dir, name), t[4])), None)

    def after_each(last=None):
        done = {}
        for name, (part, row, tokens, lr, settings) in tasks.items():
            dst = os.path.join(results_dir, name)
            if finished(dst, settings):
                done[part, row, tokens, lr, settings['max_iters']] = (
                    endpoints(dst, settings['max_iters']), read_records(os.path.join(dst, 'metrics.jsonl')))
        folder = os.path.join(results_dir, 'calibration')
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:  # earlier subset pilots
            m = re.fullmatch(r'(baseline|baseline_dropout0\.2)_t(\d+)_i(\d+)_lr([\d.e-]+)', name)
            key = m and ('subset', m[1], int(m[2]), float(m[4]), int(m[3]))
            dst = os.path.join(folder, name)
            if (key and key not in done and key[3] == learning_rate and (key[2], key[4]) != (calib_lr_tokens, calib_iters)
                    and final_eval(dst, key[4])
                    and not mismatch(dst, run_settings(key[1], seed0, iters=key[4], lr=key[3], tokens=key[2]))):
                done[key] = (endpoints(dst, key[4]), read_records(os.path.join(dst, 'metrics.jsonl')))
        write_calibration(done)
        if commit and last:
            git_commit(f"study calibration: {last} finished")
    run_all(next_task, after_each)
    after_each()


def write_calibration(done):
    ta = parse_kv(train_args)
    tok_step = ta['batch_size'] * ta.get('gradient_accumulation_steps', 1) * ta['block_size']
    md = ['# Calibration pilot', '', f'Seed {seed0}, one run per cell; cross-entropy on every window of the val '
          f'split (eval mode); the learning rate is shared by every row and min_lr is a tenth of it. Runs: '
          f"{'; '.join(sorted({e['precision'] for e, _ in done.values()})) or '-'}.", '',
          f'## Learning rate ({calib_iters} steps on {calib_lr_tokens:,} train tokens, {ta["warmup_iters"]} warm-up '
          f'steps)', '', '| learning rate | baseline final val | learned_shift0 final val | learned_shift0 train keep: '
          'at the end of warm-up, lowest, at the end |', '|---|---|---|---|']
    for lr in [float(x) for x in calib_lrs.split(',')]:
        b, lrn = (done.get(('lr', row, calib_lr_tokens, lr, calib_iters)) for row in ('baseline', 'learned_shift0'))
        keep = '-'
        if lrn:
            steps = [r for r in lrn[1] if 'keep' in r]
            warm = min(steps, key=lambda r: abs(r['iter'] - ta['warmup_iters']))
            keep = f"{warm['keep']:.3f}, {min(r['keep'] for r in steps):.3f}, {lrn[0]['keep_train']:.3f}"
        md.append(f"| {lr:g} | {fmt(b and b[0]['final_val'])} | {fmt(lrn and lrn[0]['final_val'])} | {keep} |")
    md += ['', f'## Train subset size (baseline and baseline_dropout0.2, learning rate {learning_rate:g})', '',
           '| train tokens | steps | tokens/param | passes | baseline final val | baseline best val (step) | baseline '
           'val change over the last quarter | dropout 0.2 final val | Δ dropout 0.2 − baseline (primary) |',
           '|---|---|---|---|---|---|---|---|---|']
    cells = sorted({(k[4], k[2]) for k in done if k[0] == 'subset'})
    for iters, tokens in cells:
        b, d = (done.get(('subset', row, tokens, learning_rate, iters)) for row in ('baseline', 'baseline_dropout0.2'))
        if not b:
            continue
        meta = os.path.join(data_dir, dataset_name(tokens), 'meta.json')
        n = json.load(open(meta))['train_tokens'] if os.path.exists(meta) else tokens
        evals = [r for r in b[1] if 'val/loss' in r]
        best = min(evals, key=lambda r: r['val/loss'])
        quarter = min(evals, key=lambda r: abs(r['iter'] - 0.75 * iters))
        md.append(f"| {n:,} | {iters:,} | {n / b[0]['params']:.2f} | {iters * tok_step / n:.3g} | "
                  f"{b[0]['final_val']:.3f} | {b[0]['best_val']:.3f} ({best['iter']}) | "
                  f"{evals[-1]['val/loss'] - quarter['val/loss']:+.3f} | {fmt(d and d[0]['final_val'])} | "
                  f"{fmt(d and d[0]['primary'] - b[0]['primary'], signed=True)} |")
    md += ['', 'The rule: the subset where the baseline\'s val is rising at the end and dropout 0.2 beats it by about '
           '0.1 nats; one learning rate for every row, where neither model is clearly worse and the masks do not '
           'collapse during the warm-up.', '', f'This study (reproduce.py\'s defaults): {train_tokens:,} train tokens '
           f'(cut after a whole document), {max_iters:,} steps, learning rate {learning_rate:g}, '
           f'{ta["warmup_iters"]} warm-up steps.']
    os.makedirs(results_dir, exist_ok=True)
    from runtime import atomic_write
    path = os.path.join(results_dir, 'calibration.md')
    atomic_write(path, lambda tmp: open(tmp, 'w').write('\n'.join(md) + '\n'), 'calibration.md')
    print('\n'.join(md), flush=True)


# ----------------------------------------------------------------------------- main

def model_sizes():
    """{'learned': parameters, 'baseline': parameters} at this study's shapes."""
    return {kind: cost(dict(row_config(row), **run_settings(row, seed0), vocab_size=vocab_size))['params']
            for kind, row in (('learned', 'learned_shift0'), ('baseline', 'baseline'))}


def check_matching():
    """Both shapes' parameter counts, which must agree within 1% as in the seed."""
    counts = model_sizes()
    gap = counts['learned'] / counts['baseline'] - 1
    print(f"parameters: learned {counts['learned']:,} ({learned_shape}), baseline {counts['baseline']:,} "
          f"({baseline_shape}): {gap:+.2%}")
    if abs(gap) > 0.01:
        fail(f"the learned and baseline shapes differ by {gap:+.2%} in parameters, more than 1%: adjust "
             f"learned_shape / baseline_shape")


RULES = {
    'rows': (f"len(x) > 0 and set(x.split(',')) <= set({ROWS!r})", f"a comma-separated list of {', '.join(ROWS)}"),
    'seed0': 'x >= 0', 'min_seeds': 'x >= 1', 'min_seeds_other': 'x >= 1', 'max_seeds': 'x >= 1',
    'target_ci': 'x > 0', 'max_iters': 'x >= 1', 'train_tokens': 'x >= 1', 'val_tokens': 'x >= 0',
    'vocab_size': ('257 <= x <= 50257', "257..50257 (the 256 byte tokens + merges + <|endoftext|>)"),
    'learning_rate': 'x > 0',
    'calib_tokens': ("all(s.strip().isdigit() for s in x.split(','))", "a comma-separated list of integers"),
    'calib_lrs': ("all(s.replace('.', '', 1).replace('e-', '', 1).isdigit() for s in x.split(','))",
                  "a comma-separated list of learning rates, e.g. 1e-3,2e-3"),
    'calib_iters': 'x >= 1', 'calib_lr_tokens': 'x >= 1', 'jobs': 'x >= 1',
}


def main():
    try:
        globals().update(configure({k: globals()[k] for k in (
            'rows', 'seed0', 'min_seeds', 'min_seeds_other', 'max_seeds', 'target_ci', 'max_iters', 'train_tokens',
            'val_tokens', 'vocab_size', 'learning_rate', 'learned_shape', 'baseline_shape', 'train_args', 'data_dir',
            'out_root', 'results_dir', 'jobs', 'commit', 'report_only', 'calibrate', 'calib_tokens', 'calib_lrs',
            'calib_iters', 'calib_lr_tokens')},
            sys.argv[1:], __file__, __doc__, RULES))
    except ConfigError as e:
        fail(str(e))
    if max_seeds < max(min_seeds, min_seeds_other):
        fail(f"max_seeds ({max_seeds}) must be at least min_seeds ({min_seeds}) and min_seeds_other ({min_seeds_other})")
    row_list = rows.split(',')
    if report_only:
        report(row_list)
        return
    check_matching()
    if calibrate:
        calibration()
        return
    path = prepare_data()
    os.makedirs(results_dir, exist_ok=True)
    shutil.copy(os.path.join(path, 'meta.json'), os.path.join(results_dir, 'data.json'))
    sweep(row_list)
    report(row_list)
    if commit:
        git_commit('study: the report and its charts')


if __name__ == '__main__':
    main()
