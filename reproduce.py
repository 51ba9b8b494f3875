"""
Study v3: LearnedDropout against a plain GPT, dropout and the controls, on an endpoint that does not depend
on where training stops, each row at its own learning rate, at two model sizes, on a CPU.

$ python reproduce.py --jobs=2 --commit=True   # the whole study, stage by stage; resumable run by run
                                               # (stop it at any time, run it again); finished runs committed
$ python reproduce.py --report_only=True       # rebuild the tables and charts from results/study/v3/
$ python reproduce.py --executor=slurm --jobs=40 --slurm_args=slurm_partition=cpu,timeout_min=120
                                               # the same runs as Slurm jobs (submitit), collected the same way
On a GPU, add device=cuda to --train_args, and another --results_dir.

Design, declared before any run (results/study/REPORT.md gives the reasons):
- data: the embedded Wikipedia sample re-tokenized with GPT-2's BPE cut to its first vocab_size - 1 ranks
  plus <|endoftext|>; train = the first documents of its train split up to train_tokens (S1) or
  train_tokens2 (S2) tokens; val = its whole val split, its documents dealt alternately into val_select and
  val_test (train.py's eval_halves). In data_dir/study_v<vocab>_t<tokens>.
- sizes: S1 learned 4 x 48 / plain 4 x 52 (about 237k parameters); S2 learned 6 x 64 / plain 6 x 70
  (about 500k). A config at the seed's learned width (144: learned rows, baseline_narrow) trains at the
  learned shape, any other at the plain one. S2 keeps S1's train tokens per parameter and passes over the
  train split: its steps, evaluation interval and warm-up are S1's times train_tokens2 / train_tokens.
- training: batch 32 x 128, AdamW, linear warm-up (warmup_iters: long enough that the masks do not collapse
  at the highest rate), then a cosine to learning_rate / 10 over the run; float32 everywhere; evaluated
  every eval_interval steps on every window of train (capped at val's count), val, val_select and val_test.
  One seed gives every row the same training windows: rows are compared paired by seed.
- endpoint (each run): val_test cross-entropy at the evaluation with the lowest val_select cross-entropy
  (early stopping chosen on data the endpoint does not use). Secondary: final val_test, final train CE,
  whether the best evaluation lies inside the run (before its last), and the difference along training
  (row - reference at every evaluation, paired, with its 95% band).
- stage tune (S1, seeds tune_seed0 ...): the tuned rows at every rate of lrs; a row whose best rate is at an
  edge of its grid gets one more rate beyond it (x0.5 or x2), once per edge. A row's rate is the one with
  the lowest mean (over seeds) best val_select CE. Then learned_shift0 at its rate with every penalty weight
  of penalties, chosen the same way. INHERITED rows take another row's rate. learned_random keeps each
  channel with the rate the chosen learned runs kept in training (mean over the tuning seeds of the last
  10% of steps). The best dropout rate (for S2) is the dropout row with the lower tuning score. Length
  check: if any tuned row's best evaluation is its last one in every tuning seed at its chosen settings
  (its minimum not reached), every main and pilot run trains `lengthen` (1.5) times as many steps, with
  the warm-up scaled alike and the same evaluation interval; the rates stay as tuned.
- stage s1: rows x seeds (seed0 ...) at the chosen settings (learned_static and learned_shift0 at the
  chosen penalty; learned_penalty0.1 is learned_shift0 at its config's weight 0.1, the write-up's, at
  learned_shift0's rate: added on 2026-12-07, before its runs, when the weight chosen was 0 and the
  chosen runs' masks kept 99% of channels, so that the masks of the method as written are analysed too). Stage pilot: pilot_rows at S2, half length, one seed, at S1's rate x each of
  pilot_factors; the factor with the lowest sum of best val_select CE over pilot_rows is S2's rule. Stage
  s2: rows2 (best_dropout: the best dropout rate) x seeds2 at S2, each at its S1 rate x that factor.
- statistics: per size, the declared comparisons (COMPARISONS), paired by seed: mean difference, 95%
  t-interval, two-sided p (scipy.stats.t), Holm-corrected together per size (family-wise 5%).
  The write-up's claims are worded from them by the rule REPORT.md declares (CLAIMS, verdict()).
- masks: the best evaluation's weights of every learned run of s1 and s2 are kept (model.pt, weights
  only) and mask_analysis.py runs on them over val_test.
- cost: parameters, FLOPs per token, median ms per training step (the sweep's wall time: REPORT.md).

Runs train in out_root/<stage>/<name>/ (an interrupted run resumes from its ckpt.pt); a finished run's
metrics.jsonl and config.json (and a main learned run's model.pt and mask analysis) are copied to
results_dir/<stage>/<name>/. The tables go to results_dir/results.md and .csv, the charts to results_dir.
"""

import csv
import json
import math
import os
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
INHERITED = {'moe_flops': 'baseline', 'learned_no_penalty': 'learned_shift0', 'learned_random': 'learned_shift0',
             'learned_penalty0.1': 'learned_shift0'}
# rows that train another row's config file with fixed overrides: learned_penalty0.1 is learned_shift0 at the
# write-up's penalty weight whatever weight the tuning chose
ALIASES = {'learned_penalty0.1': ('learned_shift0', {'penalty_coeff': 0.1})}
PENALISED = ['learned_shift0', 'learned_static']  # rows that train at the chosen penalty weight
DROPOUT_ROWS = ['baseline_dropout0.1', 'baseline_dropout0.2']  # the best of them is S2's best_dropout
METHOD = 'learned_shift0'  # the method: its penalty weight is tuned, learned_random keeps at its rate
COMPARISONS = [  # (row, reference): the declared family of each size (rows absent at a size are skipped)
    ('learned_shift0', 'baseline'),  # claim 1: learned beats no dropout
    ('learned_shift0', 'baseline_dropout0.2'), ('learned_shift0', 'baseline_dropout0.1'),  # claim 2: vs dropout
    ('learned_shift0', 'best_dropout'),
    ('learned_shift0', 'moe_flops'),  # claim 3: a contender to MoE at matched active FLOPs
    ('learned_no_penalty', 'learned_shift0'),  # claim 5: the penalty matters
    ('learned_penalty0.1', 'learned_shift0'),  # claim 5 when the chosen weight is 0: the write-up's weight against it
    ('learned_penalty0.1', 'baseline'),  # claim 1 at the write-up's weight
    ('learned_static', 'learned_shift0'),  # is the input needed?
    ('learned_random', 'learned_shift0'),  # is learning the mask needed?
    ('learned_shift0', 'baseline_narrow'),  # the masks at equal width
    ('baseline_dropout0.2', 'baseline'), ('baseline_dropout0.1', 'baseline'), ('best_dropout', 'baseline'),
]
# The write-up's claims, worded by the rule declared in REPORT.md (2026-12-07, before most S1 runs):
# (claim, row, reference, what the claim predicts for row - reference: -1 lower, +1 higher, 0 within MARGIN)
CLAIMS = [
    ('1. beats no dropout', 'learned_shift0', 'baseline', -1),
    ("1. beats no dropout, at the write-up's weight 0.1", 'learned_penalty0.1', 'baseline', -1),
    ('2. competitive with dropout (the best rate)', 'learned_shift0', 'best_dropout', 0),
    ('2. competitive with dropout 0.1', 'learned_shift0', 'baseline_dropout0.1', 0),  # beside the best rate
    ('2. competitive with dropout 0.2', 'learned_shift0', 'baseline_dropout0.2', 0),
    ('3. a strong contender to MoE (matched active FLOPs)', 'learned_shift0', 'moe_flops', -1),
    ('5. the penalty matters (no penalty is worse)', 'learned_no_penalty', 'learned_shift0', +1),
    ('5. the penalty matters (weight 0.1 against the chosen 0)', 'learned_penalty0.1', 'learned_shift0', -1),
]
MARGIN = 0.02  # claim 2: "competitive" when the 95% interval of learned - dropout lies below +MARGIN nats
ALL_KEPT = 0.99  # masks keeping at least this share in evaluation in every layer: the majority test is void
CONFIGS = sorted(f[:-3] for f in os.listdir(os.path.join(HERE, 'config')) if f.endswith('.py'))
LEARNED_WIDTH = 144  # the seed's learned width (config files): such a config trains at the learned shape
# -----------------------------------------------------------------------------
stages = 'tune,s1,pilot,s2'  # the stages to run, in this order (each waits for what it needs)
tuned = 'baseline,baseline_dropout0.1,baseline_dropout0.2,learned_shift0,learned_static,baseline_narrow'  # rows whose rate is tuned
rows = tuned + ',learned_no_penalty,learned_random,moe_flops,learned_penalty0.1'  # S1's rows (untuned ones inherit a rate: INHERITED)
# S2's rows; learned_static was declared, and cut as declared (the sweep was over its budget: REPORT.md)
rows2 = 'baseline,best_dropout,learned_shift0,baseline_narrow'
pilot_rows = 'baseline,learned_shift0'  # the S2 pilot's rows
seed0 = 1337  # main runs' seeds: seed0, seed0 + 1, ...
seeds = 5  # seeds per row at S1
seeds2 = 3  # seeds per row at S2 (the minimum)
tune_seed0 = 2001  # tuning seeds: tune_seed0, tune_seed0 + 1, ... (none shared with the main runs)
tune_seeds = 2  # seeds per tuning cell
lrs = '1e-3,2e-3,4e-3'  # the learning-rate grid of the tuned rows
penalties = '0,0.03,0.1,0.3'  # the penalty-weight grid of learned_shift0
pilot_factors = '0.5,1,2'  # S2's rate = S1's rate x the best of these (pilot)
pilot_seed = 3001  # the pilot's one seed
lengthen = 1.5  # main and pilot runs' length factor if a tuned row's best evaluation was its last (see the docstring)
max_iters = 2400  # S1's optimizer steps per run
eval_interval = 120  # S1's steps between evaluations
warmup_iters = 500  # S1's warm-up steps
train_tokens = 150000  # S1's training subset, in tokens of the cut tokenizer (cut after a whole document)
train_tokens2 = 316000  # S2's (the same tokens per parameter as S1)
val_tokens = 0  # 0: the whole val split; > 0: its first documents up to this many tokens (tests)
vocab_size = 2048  # GPT-2's first vocab_size - 1 ranks + <|endoftext|>
learned_shape = 'n_layer=4,n_embd=48,n_head=3'  # S1, 144-wide configs (learned rows, baseline_narrow)
baseline_shape = 'n_layer=4,n_embd=52,n_head=4'  # S1, the other configs
learned_shape2 = 'n_layer=6,n_embd=64,n_head=4'  # S2, 144-wide configs
baseline_shape2 = 'n_layer=6,n_embd=70,n_head=5'  # S2, the other configs
train_args = ('block_size=128,batch_size=32,gradient_accumulation_steps=1,eval_windows=all,eval_halves=True,'
              'log_interval=20,compile=True,dtype=float32')  # every run's other train.py settings
data_dir = 'data'  # wiki_sample is prepared here if missing; the study's data goes to data_dir/study_v*_t*
out_root = 'out/study_v3'  # run folders (checkpoints)
results_dir = 'results/study/v3'  # finished runs' records, the tables and the charts (commit these)
jobs = 1  # runs at once: local processes with cpu_count // jobs threads each, or scheduler jobs in flight
executor = 'local'  # 'local' (child processes), 'slurm' or 'submitit_local' (submitit; the local one tests it)
slurm_args = ''  # submitit parameters for executor='slurm', e.g. slurm_partition=cpu,timeout_min=120,cpus_per_task=2
commit = False  # git-commit results_dir after every finished run (a sweep spread over days loses nothing)
report_only = False  # skip training, rebuild the tables and charts
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


def floats(text):
    return [float(x) for x in text.split(',')]


def overrides(row):
    """The settings an alias row fixes on top of its config file ({} for any other row)."""
    return dict(ALIASES[row][1]) if row in ALIASES else {}


def config_path(row):
    """The config file a row trains (its own, or the one its alias names)."""
    return os.path.join(HERE, 'config', f'{ALIASES[row][0] if row in ALIASES else row}.py')


def row_config(row):
    """The settings a row's config file makes (executed as configurator does), with an alias's overrides."""
    import types
    scope = {}
    with open(config_path(row)) as f:
        exec(compile(f.read(), f.name, 'exec'), {}, scope)
    cfg = {k: v for k, v in scope.items() if not k.startswith('_') and not isinstance(v, types.ModuleType)}
    return {**cfg, **overrides(row)}


def size(name):
    """The shapes and schedule of size S1 or S2 (S2: S1's steps, evaluation interval and warm-up times
    train_tokens2 / train_tokens, so that both see their data the same number of times)."""
    if name == 'S1':
        return dict(learned=learned_shape, baseline=baseline_shape, tokens=train_tokens, max_iters=max_iters,
                    eval_interval=eval_interval, warmup_iters=warmup_iters)
    k = train_tokens2 / train_tokens
    ei = max(1, round(eval_interval * k))
    return dict(learned=learned_shape2, baseline=baseline_shape2, tokens=train_tokens2,
                max_iters=ei * (max_iters // eval_interval), eval_interval=ei, warmup_iters=round(warmup_iters * k))


# ----------------------------------------------------------------------------- data

def dataset_name(tokens):
    return f'study_v{vocab_size}_t{tokens}' + (f'_val{val_tokens}' if val_tokens else '')


def first_documents(ids, eot, limit):
    """ids cut after the last whole document within the first limit tokens."""
    ends = np.flatnonzero(ids[:limit] == eot)
    if len(ends) == 0:
        fail(f"the first {limit} tokens hold no whole document; raise train_tokens / val_tokens")
    return ids[:ends[-1] + 1]


def prepare_data(tokens):
    """data_dir/<dataset_name>: wiki_sample re-tokenized with GPT-2 cut to vocab_size - 1 ranks; train = its
    first documents up to `tokens` tokens, val = its whole val split (or val_tokens of it). Written to
    temporaries and renamed, meta.json (which records the recipe) last; redone only if the recipe changed."""
    from runtime import tmp_name
    from tokenizer import get_gpt2, get_gpt2_cut
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


# ----------------------------------------------------------------------------- one run

def run_settings(row, size_name, seed, lr, extra=None, length=1.0):
    """The train.py overrides of one run (on top of config/<row>.py): its size's shape and schedule at
    `length` times the size's steps, its seed, rate and any tuned setting (extra)."""
    cfg, sz = row_config(row), size(size_name)
    shape = parse_kv(sz['learned'] if cfg['n_embd'] == LEARNED_WIDTH else sz['baseline'])
    if cfg.get('expert_hidden'):  # an explicit expert width scales with the model's
        shape['expert_hidden'] = cfg['expert_hidden'] * shape['n_embd'] // cfg['n_embd']
    iters = max(1, round(sz['max_iters'] * length))
    return {**shape, **parse_kv(train_args), 'dataset': dataset_name(sz['tokens']), 'seed': seed,
            'max_iters': iters, 'eval_interval': sz['eval_interval'], 'warmup_iters': round(sz['warmup_iters'] * length),
            'learning_rate': lr, 'min_lr': lr / 10, 'lr_decay_iters': iters, **(extra or {})}


def read_records(path):
    from runtime import read_jsonl
    return read_jsonl(path, warn=lambda msg: print(msg, file=sys.stderr))


def final_eval(folder, iters):
    """The run's evaluation at iters (its end), or None."""
    path = os.path.join(folder, 'metrics.jsonl')
    if not os.path.isfile(path):
        return None
    return next((r for r in read_records(path) if isinstance(r, dict) and 'val/loss' in r and r['iter'] == iters), None)


def mismatch(dst, settings):
    """The first setting that dst's run was trained with differently, as 'key=theirs, this study has ours',
    or None. config.json holds what 'auto' chose; compiled or not, a run is the same experiment."""
    path = os.path.join(dst, 'config.json')
    try:
        with open(path) as f:
            conf = json.load(f)
        if not isinstance(conf, dict):
            raise ValueError('not a JSON object')
    except (OSError, ValueError) as e:
        fail(f"{path} is unreadable ({e}): remove {dst} to train that run again")
    for k, v in settings.items():
        if conf.get(k) != v and v != 'auto' and k != 'compile' and not (
                isinstance(v, float) and isinstance(conf.get(k), float) and math.isclose(v, conf[k], rel_tol=1e-12)):
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


def die_with_parent():
    """In a child, before exec: the kernel sends it SIGTERM when its parent dies (Linux), so that a killed
    reproduce.py leaves no run training without it (train.py saves a checkpoint on SIGTERM)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class SubmititRun:
    """One train.py command as a submitit job (Slurm, or submitit's local executor), polled like a child
    process; its output goes to the same train.log."""

    def __init__(self, pool, cmd, log_path, env):
        import submitit
        script = 'cd "$1" && shift && "$@" >>"$LOG" 2>&1; echo "$?"'  # the exit code is the job's result
        fn = submitit.helpers.CommandFunction(['bash', '-c', script, 'bash', HERE, *cmd],
                                              env=dict(env, LOG=os.path.abspath(log_path)), verbose=False)
        self.job, self.returncode = pool.submit(fn), None

    def poll(self):
        if self.returncode is None and self.job.done():
            try:
                self.returncode = int(str(self.job.result()).strip().splitlines()[-1])
            except Exception:  # the job itself failed (scheduler, time limit): its log says why
                self.returncode = 1
        return self.returncode

    def send_signal(self, signum):
        self.job.cancel(check=False)  # Slurm sends SIGTERM first: train.py saves a checkpoint

    def wait(self):
        while self.poll() is None:
            time.sleep(1)


scheduler = None  # the submitit executor, made once


def launch(cmd, log_path, env):
    global scheduler
    if executor == 'local':
        with open(log_path, 'a') as log:
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent)
    if scheduler is None:
        import submitit
        scheduler = submitit.AutoExecutor(os.path.join(out_root, 'submitit'),
                                          cluster='local' if executor == 'submitit_local' else 'slurm')
        scheduler.update_parameters(**parse_kv(slurm_args)) if executor == 'slurm' else None
    return SubmititRun(scheduler, cmd, log_path, env)


stop_signal = None


def start_run(task):
    """Start training (or resuming) a task's run folder; its output goes to train.log."""
    out_dir = os.path.join(out_root, task['stage'], task['name'])
    resume = os.path.exists(os.path.join(out_dir, 'ckpt.pt'))
    cmd = [sys.executable, os.path.join(HERE, 'train.py'), config_path(task['row']),
           f'--out_dir={out_dir}', f'--data_dir={data_dir}', f"--wandb_run_name={task['name']}",
           '--init_from=resume' if resume else '--init_from=scratch', '--overwrite=True']
    cmd += [f'--{k}={v}' for k, v in task['settings'].items()]
    env = dict(os.environ)
    if jobs > 1 and executor == 'local':  # share the cores: oversubscribed OpenMP threads spin-wait
        env['OMP_NUM_THREADS'] = str(max(1, (os.cpu_count() or 1) // jobs))
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.join(out_dir, 'train.log')
    with open(log_path, 'a') as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
    return dict(task, out_dir=out_dir, child=launch(cmd, log_path, env), log_path=log_path, resume=resume,
                t0=time.time())


def keep_weights(out_dir, dst):
    """dst/model.pt: the weights of out_dir's best.pt (the evaluation with the lowest val_select CE) and
    what loading them needs, without the optimizer (about 1 MB at S1)."""
    import torch
    best = torch.load(os.path.join(out_dir, 'best.pt'), map_location='cpu', weights_only=True)
    keep = {k: best[k] for k in ('model', 'model_type', 'model_args', 'config', 'iter_num', 'tokenizer_cut')
            if k in best}
    from runtime import tmp_name
    path = os.path.join(dst, 'model.pt')
    torch.save(keep, tmp_name(path))
    os.replace(tmp_name(path), path)


def analyse_masks(dst):
    """mask_analysis.py on dst/model.pt over val_test; its JSON lands in dst. An error, not a warning, if
    it fails: the study promises it for every learned run."""
    r = subprocess.run([sys.executable, os.path.join(HERE, 'mask_analysis.py'), f'--out_dir={dst}',
                        '--checkpoint=model.pt', '--split=val_test', f'--data_dir={data_dir}'],
                       capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"mask_analysis.py failed on {dst}: {(r.stderr.strip().splitlines() or ['?'])[-1]}")


def finish_run(run, code):
    """After a child exits: copy a finished run's records (and a learned run's weights and mask analysis)
    to its dst; the error of a failed one (None when it finished or was stopped by a signal)."""
    name, out_dir = run['name'], run['out_dir']
    stopped = code < 0 or code in (128 + signal.SIGINT, 128 + signal.SIGTERM)  # by the forwarded signal
    if code != 0 and not (stop_signal and stopped):  # stopped, not failed
        with open(run['log_path']) as f:
            last = [line.strip() for line in f if line.strip()][-1:]
        return f"{name} failed (exit {code}): {last[0] if last else '?'} (log: {run['log_path']})"
    if final_eval(out_dir, run['settings']['max_iters']) is None:
        return None if stop_signal else f"{name} ended before its last step (log: {run['log_path']})"
    from runtime import tmp_name
    dst = run['dst']
    os.makedirs(dst, exist_ok=True)
    if run['stage'] in ('s1', 's2') and row_config(run['row']).get('model_type') == 'learned':  # main runs only
        keep_weights(out_dir, dst)
        analyse_masks(dst)
    for f in ('config.json', 'metrics.jsonl'):  # metrics.jsonl last: it marks the run finished
        shutil.copy(os.path.join(out_dir, f), tmp_name(os.path.join(dst, f)))
        os.replace(tmp_name(os.path.join(dst, f)), os.path.join(dst, f))
    print(f"{run['stage']}/{name}: done in {time.time() - run['t0']:.0f} s{' (resumed)' if run['resume'] else ''}",
          flush=True)
    return None


def run_all(next_task, after_each):
    """Train the runs that next_task(names in flight) gives, `jobs` at a time, until it gives None; call
    after_each() when one has finished. SIGINT/SIGTERM stop every run (train.py saves a checkpoint) and the
    sweep; the same command resumes them. A failed run stops the others the same way."""
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
                running.append(start_run(task))
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
                    after_each(r)
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


# ----------------------------------------------------------------------------- endpoints and statistics

def endpoints(folder):
    """The declared endpoints of one finished run (see the docstring)."""
    path = os.path.join(folder, 'metrics.jsonl')
    recs = [r for r in read_records(path) if isinstance(r, dict)]
    evals = sorted({r['iter']: r for r in recs if 'val_select/loss' in r}.values(), key=lambda r: r['iter'])
    if not evals:
        fail(f"{path} has no val_select evaluation: not a run of this study (eval_halves=True)")
    bad = [r['iter'] for r in evals if not all(math.isfinite(r.get(k, math.nan))
                                              for k in ('val_select/loss', 'val_test/loss', 'train/loss'))]
    if bad:
        fail(f"{path}: a loss that is not a finite number at iter {bad[0]}: remove {folder} to train it again")
    best = min(evals, key=lambda r: r['val_select/loss'])  # the first of equals
    steps = [r for r in recs if 'loss' in r]
    tail = steps[-max(1, len(steps) // 10):]
    with open(os.path.join(folder, 'config.json')) as f:
        conf = json.load(f)
    out = {'primary': best['val_test/loss'], 'select': best['val_select/loss'], 'best_iter': best['iter'],
           'inside': best['iter'] < evals[-1]['iter'], 'final_test': evals[-1]['val_test/loss'],
           'final_train': evals[-1]['train/loss'], 'curve': {r['iter']: r['val_test/loss'] for r in evals},
           'ms': statistics.median([r['ms_per_iter'] for r in steps if 'ms_per_iter' in r] or [math.nan]),
           'keep_train': statistics.mean(r['keep'] for r in tail) if 'keep' in steps[-1] else None,
           'keep_eval': best.get('val_test/keep'), **cost(conf)}
    mask_path = os.path.join(folder, 'mask_analysis_model_val_test.json')
    if os.path.exists(mask_path):
        with open(mask_path) as f:
            out['masks'] = json.load(f)
    return out


def cost(conf):
    """Parameters (total, active per token) and training FLOPs per token of the run's model."""
    import dataclasses
    module = model_module(conf['model_type'])
    fields = {f.name: conf[f.name] for f in dataclasses.fields(module.GPTConfig) if f.name in conf}
    m = module.GPT(module.GPTConfig(**fields))
    total = m.get_num_params()
    active = m.get_num_active_params() if hasattr(m, 'get_num_active_params') else total
    return {'params': total, 'active': active, 'flops': m.flops_per_token()}


def paired(diffs):
    """Mean, SD, half-width of the 95% t-interval, n and two-sided p of paired differences; the spread
    fields are None with fewer than 2."""
    from scipy import stats
    n = len(diffs)
    out = {'n': n, 'mean': statistics.mean(diffs) if diffs else None, 'sd': None, 'half': None, 'p': None}
    if n >= 2:
        sd = statistics.stdev(diffs)
        se = sd / math.sqrt(n)
        out.update(sd=sd, half=stats.t.ppf(0.975, n - 1) * se,
                   p=(0.0 if out['mean'] else 1.0) if se == 0 else 2 * stats.t.sf(abs(out['mean']) / se, n - 1))
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


# ----------------------------------------------------------------------------- the stages

def task(stage, name, row, settings):
    return dict(stage=stage, name=name, row=row, settings=settings, dst=os.path.join(results_dir, stage, name))


def result(t):
    """A task's endpoints once it has finished, else None."""
    return endpoints(t['dst']) if finished(t['dst'], t['settings']) else None


def choose(cells):
    """cells {value: [task per seed]} -> ({value: mean best val_select CE} of the finished cells, the lowest
    value or None while a cell is unfinished, {value: (mean, seeds finished)} of the part-finished cells)."""
    scores, partial = {}, {}
    for value, tasks in cells.items():
        eps = [e for e in map(result, tasks) if e]
        if len(eps) == len(tasks):
            scores[value] = statistics.mean(e['select'] for e in eps)
        elif eps:
            partial[value] = (statistics.mean(e['select'] for e in eps), len(eps))
    return scores, (min(scores, key=scores.get) if len(scores) == len(cells) else None), partial


def tuning():
    """The tuning stage as it stands: its tasks (those that can be known now), and each choice (None until
    its cells have finished)."""
    def cell(row, lr, extra=None, tag=''):
        return [task('tune', f'{row}_lr{lr:g}{tag}_s{tune_seed0 + k}', row,
                     run_settings(row, 'S1', tune_seed0 + k, lr, extra)) for k in range(tune_seeds)]
    base, keyed = sorted(floats(lrs)), []  # (phase, seed, order, task)
    lr, scores, partial, chosen_cells = {}, {}, {}, {}
    for i, row in enumerate(tuned.split(',')):
        grid = list(base)
        while True:
            cells = {x: cell(row, x) for x in grid}
            scores[row], best, partial[row] = choose(cells)
            if best is not None and best == grid[0] == base[0]:  # the best rate at an edge: one more beyond it
                grid.insert(0, best / 2)
            elif best is not None and best == grid[-1] == base[-1]:
                grid.append(best * 2)
            else:
                break
        lr[row] = best
        chosen_cells[row] = cells.get(best, [])
        keyed += [(0 if x in base else 1, k, i, t) for x in grid for k, t in enumerate(cells[x])]
    choice = {'lr': lr, 'scores': scores, 'partial': partial, 'penalty': None, 'penalty_scores': {},
              'penalty_partial': {}, 'penalty_cells': {}, 'keep': None, 'best_dropout': None}
    own = row_config(METHOD)['penalty_coeff']
    if METHOD not in lr:  # not tuned: the penalised rows keep their config's weight
        choice['penalty'] = own
    elif lr[METHOD] is not None:
        cells = {p: (cell(METHOD, lr[METHOD]) if p == own else
                     cell(METHOD, lr[METHOD], {'penalty_coeff': p}, f'_pen{p:g}')) for p in floats(penalties)}
        keyed += [(2, k, 0, t) for p, c in cells.items() if p != own for k, t in enumerate(c)]
        choice['penalty_scores'], choice['penalty'], choice['penalty_partial'] = choose(cells)
        choice['penalty_cells'] = cells
        if choice['penalty'] is not None:
            choice['keep'] = statistics.mean(result(t)['keep_train'] for t in cells[choice['penalty']])
            chosen_cells[METHOD] = cells[choice['penalty']]
    rates = [r for r in DROPOUT_ROWS if r in lr]
    if rates and all(lr[r] is not None for r in rates):
        choice['best_dropout'] = min(rates, key=lambda r: scores[r][lr[r]])
    choice['tasks'] = [t for *_, t in sorted(keyed, key=lambda x: x[:3])]
    choice['complete'] = all(v is not None for v in (*lr.values(), choice['penalty'])) and (
        choice['best_dropout'] is not None or not any(r in DROPOUT_ROWS for r in lr))
    # the declared length check: a row whose best evaluation is the last one in every tuning seed at its chosen
    # settings has not reached its minimum; then every main and pilot run trains lengthen times as long
    choice['unsettled'] = [row for row, c in chosen_cells.items() if c and all(not result(t)['inside'] for t in c)]
    choice['length'] = lengthen if choice['unsettled'] else 1.0
    return choice


def main_settings(row, size_name, seed, choice, factor=1.0, length=1.0):
    """A main (or pilot) run's settings: its rate (its own or the row's it inherits, times factor), the
    chosen penalty for the penalised rows, the learned rows' training keep rate for learned_random."""
    extra = {'penalty_coeff': choice['penalty']} if row in PENALISED else overrides(row)
    if row == 'learned_random':  # keep probability q = 0.5 cos(shift) + 0.5
        extra['shift_init'] = math.acos(2 * choice['keep'] - 1)
    return run_settings(row, size_name, seed, choice['lr'][INHERITED.get(row, row)] * factor, extra, length)


def same_as_method(row, choice):
    """Whether a row would train the very runs of the method at the chosen penalty weight (learned_no_penalty
    when the weight chosen is 0, learned_penalty0.1 when it is 0.1): its config but for the weight."""
    if INHERITED.get(row) != METHOD or row in PENALISED:
        return False
    rest = lambda c: {k: v for k, v in c.items() if k not in ('out_dir', 'penalty_coeff')}  # noqa: E731
    cfg, method = row_config(row), row_config(METHOD)
    return rest(cfg) == rest(method) and cfg['penalty_coeff'] == choice['penalty']


def size_rows(size_name, choice):
    """The rows of a size's main stage, S1's or S2's (best_dropout: the best dropout rate), without a row
    that would repeat the method's runs (same_as_method)."""
    if size_name == 'S1':
        return [r for r in rows.split(',') if not same_as_method(r, choice)]
    return [choice['best_dropout'] if r == 'best_dropout' else r for r in rows2.split(',')
            if (r != 'best_dropout' or choice['best_dropout']) and not same_as_method(r, choice)]


def pilot(choice):
    """The pilot's tasks and S2's rate factor (None until they have finished)."""
    factors = floats(pilot_factors)
    cells = {f: [task('pilot', f'{row}_x{f:g}_s{pilot_seed}', row,
                      main_settings(row, 'S2', pilot_seed, choice, f, 0.5 * choice['length']))
                 for row in pilot_rows.split(',')]
             for f in factors}
    sums = {}
    for f, tasks in cells.items():
        eps = [result(t) for t in tasks]
        if all(eps):
            sums[f] = sum(e['select'] for e in eps)
    factor = min(sums, key=sums.get) if len(sums) == len(cells) else None
    return [t for f in factors for t in cells[f]], sums, factor


def main_tasks(stage, choice, factor=1.0):
    size_name, n = ('S1', seeds) if stage == 's1' else ('S2', seeds2)
    return [task(stage, f'{row}_s{seed0 + k}', row,
                 main_settings(row, size_name, seed0 + k, choice, factor, choice['length']))
            for k in range(n) for row in size_rows(size_name, choice)]


def plan():
    """{stage: its tasks as far as they can be known now}, the tuning choices and the pilot's outcome."""
    choice = tuning()
    out = {'tune': choice['tasks'], 's1': [], 'pilot': [], 's2': []}
    pilot_tasks, sums, factor = ([], {}, None)
    if choice['complete']:
        out['s1'] = main_tasks('s1', choice)
        pilot_tasks, sums, factor = pilot(choice)
        out['pilot'] = pilot_tasks
        if factor is not None:
            out['s2'] = main_tasks('s2', choice, factor)
    return out, choice, (sums, factor)


def sweep():
    t0, n = time.time(), 0
    order = stages.split(',')

    def next_task(busy):
        tasks, _, _ = plan()
        for stage in order:
            for t in tasks[stage]:
                if t['name'] not in busy and not finished(t['dst'], t['settings']):
                    return t
        return None

    def after_each(run):
        nonlocal n
        n += 1
        if commit:  # the tables as they stand (the charts at the end, or with --report_only)
            total = report(quiet=True)
            git_commit(f"study v3: {run['stage']}/{run['name']} finished ({total} finished run{'s' * (total > 1)})")
    run_all(next_task, after_each)
    tasks, choice, (_, factor) = plan()
    left = [s for s in order if not tasks[s] or any(not finished(t['dst'], t['settings']) for t in tasks[s])]
    print(f"sweep: {n} run(s) this invocation, {(time.time() - t0) / 60:.1f} min; "
          + (f"stage(s) {', '.join(left)} not complete" if left else "every stage asked for is complete"))


# ----------------------------------------------------------------------------- report

def fmt(x, digits=3, signed=False):
    return '-' if x is None else f"{x:{'+' if signed else ''}.{digits}f}"


def side(s):
    """Where the 95% interval of paired() statistics s lies: '+' above 0, '−' below, '0' covering it."""
    return '+' if s['mean'] - s['half'] > 0 else '−' if s['mean'] + s['half'] < 0 else '0'


def along_signs(along):
    """[(step, side())] of the difference along training (steps with a single seed are left out)."""
    return [(i, side(x)) for i, x in along if x['half'] is not None]


def sign_runs(signs):
    """along_signs() as runs of one sign with their steps, e.g. '0 at 0; − 120-1440; + 1560-3600'."""
    runs = []
    for i, sign in signs:
        if runs and runs[-1][0] == sign:
            runs[-1][2] = i
        else:
            runs.append([sign, i, i])
    return '; '.join(f'{sign} at {a}' if a == b else f'{sign} {a}-{b}' for sign, a, b in runs)


def fmt_p(p):
    return '-' if p is None else '<0.0001' if p < 1e-4 else f'{p:.4f}'


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


def comparisons(rows, best_dropout, size_name):
    """The declared comparisons among rows, without repeats; best_dropout stands for that row at S2 (at S1
    both dropout rates are compared on their own)."""
    out = []
    for row, ref in COMPARISONS:
        if size_name == 'S1' and 'best_dropout' in (row, ref):
            continue
        pair = tuple(best_dropout if x == 'best_dropout' else x for x in (row, ref))
        if all(x in rows for x in pair) and pair not in out:
            out.append(pair)
    return out


def size_results(tasks):
    """{row: {seed: endpoints}} of a main stage's finished runs, and {row: its learning rate}."""
    done, rates = {}, {}
    for t in tasks:
        rates[t['row']] = t['settings']['learning_rate']
        e = result(t)
        if e:
            done.setdefault(t['row'], {})[t['settings']['seed']] = e
    return done, rates


def differences(done, pairs):
    """{(row, ref): statistics of the paired differences} and the Holm verdicts of the primary endpoint."""
    stats = {}
    for row, ref in pairs:
        both = sorted(set(done.get(row, {})) & set(done.get(ref, {})))
        if not both:
            continue
        a, b = [done[row][s] for s in both], [done[ref][s] for s in both]
        iters = sorted(set.intersection(*(set(e['curve']) for e in a + b)))
        stats[row, ref] = {
            'primary': paired([x['primary'] - y['primary'] for x, y in zip(a, b)]),
            'final_test': paired([x['final_test'] - y['final_test'] for x, y in zip(a, b)]),
            'final_train': paired([x['final_train'] - y['final_train'] for x, y in zip(a, b)]),
            'inside': (sum(x['inside'] for x in a), sum(y['inside'] for y in b), len(both)),
            'along': [(i, paired([x['curve'][i] - y['curve'][i] for x, y in zip(a, b)])) for i in iters]}
    rejected = holm({k: s['primary']['p'] for k, s in stats.items() if s['primary']['p'] is not None})
    return stats, rejected


def verdict(s, rejected, predicts):
    """A claim's word, by the declared rule, from its primary difference s (paired()) and Holm's verdict:
    "supported" / "contradicted" only when the difference survives Holm; claim 2 (predicts 0) is
    "competitive" when the interval lies below +MARGIN."""
    if s['half'] is None:
        return 'too few seeds'
    high = s['mean'] + s['half']
    if predicts == 0:
        if rejected and s['mean'] > 0:
            return 'contradicted' + (f' (yet within +{MARGIN:g})' if high < MARGIN else '')
        return 'competitive' if high < MARGIN else 'not distinguishable'
    if rejected:
        return 'supported' if predicts * s['mean'] > 0 else 'contradicted'
    return 'not distinguishable'


def claim_lines(size_name, done, stats, rejected, best_dropout):
    """Markdown rows of the claims table at one size. The declared reading rule for a row whose best
    evaluation is the last one in most seeds is applied: no verdict for a claim rests on such a row being
    the one the claim beats (the word is withheld), and one against a claim that favours such a row may
    be overstated. A claim none of whose rows ran at S2 is "not tested at S2"."""
    out, seen, tested = [], set(), set()  # tested: claim numbers with a line
    for claim, row, ref, predicts in CLAIMS:
        key = (row, best_dropout if ref == 'best_dropout' else ref)
        if key not in stats or key in seen:
            continue  # a row absent at this size; a dropout rate's own line when it is the best rate
        seen.add(key)
        tested.add(claim.split('.')[0])
        st = stats[key]
        word = verdict(st['primary'], rejected.get(key, False), predicts)
        last = {name: sum(not e['inside'] for e in done[name].values()) for name in key}  # best eval the last
        late = [name for name in key if 2 * last[name] > len(done[name])]  # in most of its seeds
        favoured, beaten = key[::-1] if predicts > 0 else key
        if word in ('supported', 'competitive') and beaten in late:
            word = f'withheld: {beaten} had not reached its minimum (else {word})'
        elif word.startswith('contradicted') and favoured in late:
            word += f' (possibly overstated: {favoured} had not reached its minimum)'
        settle = ', '.join(f'{name}: last in {last[name]} of {len(done[name])}' for name in late) or '-'
        out.append(f"| {claim} | {size_name} | {key[0]} − {key[1]} | {interval(st['primary'])} | "
                   f"{fmt_p(st['primary']['p'])} | {word} | {settle} |")
    if size_name != 'S1':
        first = {}  # claim number -> its first wording
        for claim, *_ in CLAIMS:
            first.setdefault(claim.split('.')[0], claim.split(' (')[0])
        out += [f'| {claim} | {size_name} | - | - | - | not tested at {size_name} | - |'
                for number, claim in first.items() if number not in tested]
    return out


def mask_claim_lines(size_name, learned):
    """Markdown rows: is each input-computed mask row's mask input-dependent, by the declared rule (replacing
    each channel's mask by its majority value over val_test raises val_test CE, 95% interval above 0)."""
    out = []
    for row, runs in learned.items():
        masks = [e['masks'] for e in runs.values() if 'masks' in e]
        if row_config(row).get('mask_class') or not masks:
            continue  # the static and random controls do not read the input by construction
        s = paired([m['ce_majority'] - m['ce'] for m in masks])
        keep = min(layer['keep'] for m in masks for layer in m['layers'])  # every run's every layer
        if s['half'] is None:
            word = 'too few seeds'
        elif side(s) == '+':
            word = 'yes: the loss rises without it'
        elif keep >= ALL_KEPT:
            word = f'not tested: the masks keep at least {ALL_KEPT:.0%} of channels in every layer in evaluation'
        elif side(s) == '−':
            word = 'not shown: the loss falls with majority masks'
        else:
            word = 'not shown: the interval covers 0'
        out.append(f'| {row} | {size_name} | {interval(s)} | {keep:.3f} | {word} |')
    return out


def direction_lines(per_size):
    """Markdown rows from {size: stats of differences()}: each comparison made at both sizes, its mean and
    interval at each, and whether the signs of the means agree (three seeds at S2: a direction, never a trend)."""
    if len(per_size) < 2:
        return []
    a, b = per_size.values()
    out = []
    for key in a:
        if key in b and b[key]['primary']['half'] is not None:
            x, y = a[key]['primary']['mean'], b[key]['primary']['mean']
            out.append(f"| {key[0]} − {key[1]} | {interval(a[key]['primary'])} | {interval(b[key]['primary'])} | "
                       f"{'same' if x * y > 0 else 'differs' if x * y < 0 else 'a mean is 0'} |")
    return out


def cell_text(scores, partial, value):
    """A tuning cell: its mean score, or the mean of its finished seeds so far (n of tune_seeds), or -."""
    if value in scores:
        return fmt(scores[value], 4)
    return f"{partial[value][0]:.4f} ({partial[value][1]} of {tune_seeds} seeds)" if value in partial else '-'


def mask_lines(done):
    """Markdown lines of the mask analysis of the learned rows (mean over seeds, per layer)."""
    head = ['row', 'layer', 'var(M)', 'within-channel share of var(M)', 'constant channels',
            'MI(mask; token) - null, bits', 'keep (eval)']
    md = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    ce = ['| row | seeds | CE as trained | majority per channel − CE | keep rate per channel − CE | sampled − CE |',
          '|---|---|---|---|---|---|']
    for row, runs in done.items():
        masks = [e['masks'] for e in runs.values() if 'masks' in e]
        if not masks:
            continue
        for li in range(len(masks[0]['layers'])):
            layer = [m['layers'][li] for m in masks]
            md.append('| ' + ' | '.join([row, str(li), mean_sd([x['m_var'] for x in layer], 5),
                                         mean_sd([x['within_share'] for x in layer]),
                                         mean_sd([x['constant_share'] for x in layer]),
                                         mean_sd([x['mi_bits'] - x['mi_null_bits'] for x in layer], 4),
                                         mean_sd([x['keep'] for x in layer])]) + ' |')
        ce.append('| ' + ' | '.join([row, str(len(masks)), mean_sd([m['ce'] for m in masks]),
                                     interval(paired([m['ce_majority'] - m['ce'] for m in masks])),
                                     interval(paired([m['ce_mean'] - m['ce'] for m in masks])),
                                     interval(paired([m['ce_sampled'] - m['ce'] for m in masks
                                                      if m['ce_sampled'] is not None]))]) + ' |')
    return md + [''] + ce


def pyplot():
    """matplotlib.pyplot without a display (imported only when a chart is drawn)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def save_chart(fig, path):
    """fig as a png at path, written to a temporary and renamed; the figure is closed."""
    from runtime import atomic_write
    atomic_write(path, lambda tmp: fig.savefig(tmp, format='png', dpi=110), os.path.basename(path))
    pyplot().close(fig)


def mask_chart(done, path, title):
    """The mask analysis of every learned run, one dot per seed: per layer, var(M), its within-channel
    share and MI(mask; token) above its shuffled null; per row, the CE change of the functional tests."""
    plt = pyplot()
    runs = {row: [e['masks'] for e in r.values() if 'masks' in e] for row, r in done.items()}
    runs = {row: m for row, m in runs.items() if m}
    if not runs:
        return
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.2))
    panels = [('var(M)', lambda x: x['m_var']), ('within-channel share of var(M)', lambda x: x['within_share']),
              ('MI(mask; token) − shuffled null, bits', lambda x: x['mi_bits'] - x['mi_null_bits'])]
    width = 0.8 / len(runs)
    for k, (row, masks) in enumerate(runs.items()):
        color = f'C{k}'
        for ax, (label, get) in zip(axes, panels):
            for li in range(len(masks[0]['layers'])):
                ys = [y for y in (get(m['layers'][li]) for m in masks) if y is not None]  # None: M is constant
                ax.scatter([li - 0.4 + width * (k + 0.5)] * len(ys), ys, s=10, color=color,
                           label=row if li == 0 else None)
            ax.set_title(label, fontsize=8)
            ax.set_xlabel('layer', fontsize=8)
            ax.set_xticks(range(len(masks[0]['layers'])))
        for j, test in enumerate(('ce_majority', 'ce_mean', 'ce_sampled')):
            ys = [m[test] - m['ce'] for m in masks if m[test] is not None]  # soft masks: no sampled test
            axes[3].scatter([j - 0.4 + width * (k + 0.5)] * len(ys), ys, s=10, color=color)
    axes[0].set_yscale('symlog', linthresh=1e-6)  # log, but a fixed mask's 0 still shows
    axes[0].set_ylim(bottom=0)
    axes[0].legend(fontsize=7)
    axes[3].set_xticks([0, 1, 2], ['majority', 'keep rate', 'sampled'])
    axes[3].axhline(0, color='k', lw=0.6)
    axes[3].set_title('val_test CE with masks replaced − as trained', fontsize=8)
    for ax in axes:
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_chart(fig, path)


def along_chart(stats, path, title):
    """The differences along training: each comparison's mean difference in val_test CE at every
    evaluation with its 95% band, one panel each; written atomically."""
    plt = pyplot()
    pairs = [k for k, s in stats.items() if len(s['along']) > 1 and s['primary']['n'] >= 2]
    if not pairs:
        return
    cols = min(3, len(pairs))
    rows_n = math.ceil(len(pairs) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 2.8 * rows_n), squeeze=False)
    for ax, key in zip(axes.flat, pairs):
        it = [i for i, _ in stats[key]['along']]
        m = np.array([s['mean'] for _, s in stats[key]['along']])
        h = np.array([s['half'] for _, s in stats[key]['along']])
        ax.fill_between(it, m - h, m + h, alpha=0.25)
        ax.plot(it, m)
        ax.axhline(0, color='k', lw=0.6)
        ax.set_title(f'{key[0]} − {key[1]}', fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(pairs):]:
        ax.axis('off')
    fig.suptitle(title, fontsize=9)
    fig.supxlabel('step', fontsize=8)
    fig.supylabel('Δ val_test CE (nats), 95% band', fontsize=8)
    fig.tight_layout()
    save_chart(fig, path)


def report(quiet=False):
    """results.md and the csv files from the finished runs (the charts too unless quiet). Returns the
    number of finished runs."""
    from runtime import atomic_write
    tasks, choice, (sums, factor) = plan()
    n_done = sum(bool(finished(t['dst'], t['settings'])) for ts in tasks.values() for t in ts)
    if not n_done:
        fail(f"no finished runs of this design in {results_dir}; run the sweep first (python reproduce.py) "
             f"or point --results_dir at its results")
    sizes = {s: shape_params(s) for s in ('S1', 'S2')}
    s1, s2 = size('S1'), size('S2')
    md = ['# Study v3: results', '', f'Generated by `python reproduce.py` ({n_done} finished runs); the design is in '
          f'the docstring of reproduce.py and in results/study/REPORT.md.', '', '## Sizes', '',
          '| size | learned / plain shape | parameters (learned / plain) | train tokens | steps (warm-up) | eval every |',
          '|---|---|---|---|---|---|']

    def steps(sz, length, stage):  # as run_settings rounds them
        return f"{round(sz['max_iters'] * length):,} ({round(sz['warmup_iters'] * length)}) {stage}"
    for s, sz, runs in (('S1', s1, (steps(s1, 1.0, 'tuning'), steps(s1, choice['length'], 'main'))),
                        ('S2', s2, (steps(s2, 0.5 * choice['length'], 'pilot'), steps(s2, choice['length'], 'main')))):
        md.append(f"| {s} | {sz['learned']} / {sz['baseline']} | {sizes[s]['learned']:,} / {sizes[s]['baseline']:,} | "
                  f"{sz['tokens']:,} | {', '.join(runs)} | {sz['eval_interval']} |")
    # tuning
    grid = sorted({lr for row in tuned.split(',') for lr in (*choice['scores'][row], *choice['partial'][row])}
                  | set(floats(lrs)))
    md += ['', f'## Tuning (S1, seeds {tune_seed0}..{tune_seed0 + tune_seeds - 1}): mean best val_select CE', '',
           '| row | ' + ' | '.join(f'{x:g}' for x in grid) + ' | chosen |', '|---|' + '---|' * (len(grid) + 1)]
    for row in tuned.split(','):
        chosen = '-' if choice['lr'][row] is None else f"{choice['lr'][row]:g}"
        md.append(f'| {row} | ' + ' | '.join(cell_text(choice['scores'][row], choice['partial'][row], x) for x in grid)
                  + f' | {chosen} |')
    for row, src in INHERITED.items():
        if row in rows.split(',') + rows2.split(','):
            fixed = ''.join(f', {k} {v:g}' for k, v in overrides(row).items())
            md.append(f'| {row} | ' + ' | '.join('' for _ in grid) + (
                f" | not run: {METHOD} at the chosen weight |" if choice['penalty'] is not None and
                same_as_method(row, choice) else f" | {src}'s{fixed} |"))
    ps = choice['penalty_scores']
    pen = '-' if choice['penalty'] is None else f"{choice['penalty']:g}"
    md += ['', '| learned_shift0 penalty weight | ' + ' | '.join(f'{p:g}' for p in floats(penalties)) + ' | chosen |',
           '|---|' + '---|' * (len(floats(penalties)) + 1),
           '| mean best val_select CE | ' + ' | '.join(cell_text(ps, choice['penalty_partial'], p) for p in floats(penalties))
           + f' | {pen} |']
    cells = {p: [result(t) for t in c] for p, c in choice['penalty_cells'].items()}
    for label, key, digits in (('mean val_test CE there (not used to choose)', 'primary', 4),
                               ('mean keep rate in training (last 10% of steps)', 'keep_train', 3)):
        md.append(f'| {label} | ' + ' | '.join(
            fmt(statistics.mean(e[key] for e in cells[p]), digits) if p in cells and all(cells[p]) else '-'
            for p in floats(penalties)) + ' | |')
    md += ['',
           f"learned_random keeps each channel with probability {fmt(choice['keep'], 4)} (the chosen learned runs' "
           f"training keep rate); the best dropout rate: {choice['best_dropout'] or '-'}. Length check: "
           + (f"best evaluation at the last one in every tuning seed for {', '.join(choice['unsettled'])}, so the "
              f"main and pilot runs train {lengthen:g}x as long" if choice['unsettled'] else
              "every chosen row's best evaluation lies inside its tuning runs so far") + '.', '',
           '| S2 pilot: rate factor | ' + ' | '.join(pilot_factors.split(',')) + ' | chosen |',
           '|---|' + '---|' * (len(floats(pilot_factors)) + 1),
           f"| sum of best val_select CE ({pilot_rows.replace(',', ', ')}) | " + ' | '.join(fmt(sums.get(f), 4) for f in floats(pilot_factors))
           + f" | {'-' if factor is None else f'{factor:g}'} |"]
    per_run, diff_rows, along_rows = [], [], []
    per_size, claims, mask_claims = {}, [], []  # for the claims section, after both sizes
    for stage, s in (('s1', 'S1'), ('s2', 'S2')):  # a stage whose inputs are not chosen yet has no tasks
        done, rates = size_results(tasks[stage])
        if not done:
            continue
        head = ['row', 'seeds', 'lr', 'params (active)', 'FLOPs/token', 'val_test CE at best val_select (primary)',
                'final val_test CE', 'final train CE', 'best eval inside the run', 'best step (mean)', 'keep (train)',
                'ms/step']
        md += ['', f'## {s}: results (mean ± SD over seeds)', '', '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
        for row, runs in done.items():
            es = list(runs.values())
            lr = rates[row]
            e0 = es[0]
            md.append('| ' + ' | '.join([
                row, str(len(es)), f'{lr:.3g}', f"{e0['params']:,}" + (f" ({e0['active']:,})" if e0['active'] != e0['params'] else ''),
                f"{e0['flops'] / 1e6:.2f}M", mean_sd([e['primary'] for e in es]), mean_sd([e['final_test'] for e in es]),
                mean_sd([e['final_train'] for e in es]), f"{sum(e['inside'] for e in es)}/{len(es)}",
                f"{statistics.mean(e['best_iter'] for e in es):.0f}", mean_sd([e['keep_train'] for e in es], 3),
                f"{statistics.median(e['ms'] for e in es):.0f}"]) + ' |')
            per_run += [{'size': s, 'row': row, 'seed': seed, 'lr': lr,
                         **{k: v for k, v in e.items() if k not in ('curve', 'masks')}} for seed, e in sorted(runs.items())]
        stats, rejected = differences(done, comparisons(list(done), choice['best_dropout'], s))
        per_size[s] = stats
        claims += claim_lines(s, done, stats, rejected, choice['best_dropout'])
        head = ['row', 'vs', 'Δ primary [95% CI] (n)', 'p', f'Holm (5%, m={len(rejected)})', 'Δ final val_test [95% CI]',
                'Δ final train CE [95% CI]', 'best inside (row / ref)', 'Δ along training: sign at evals (+ / − / CI covers 0)',
                'Δ along training by step']
        md += ['', f'## {s}: paired differences (row − reference, same seed; nats)', '',
               'The primary comparisons are Holm-corrected together; "distinguishable" means the difference from zero '
               'survives the correction. Other columns: uncorrected 95% intervals.', '',
               '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
        for key, st in stats.items():
            verdict = '-' if key not in rejected else ('distinguishable' if rejected[key] else 'not distinguishable')
            signs = along_signs(st['along'])
            count = [sign for _, sign in signs].count
            md.append('| ' + ' | '.join([key[0], key[1], interval(st['primary']), fmt_p(st['primary']['p']), verdict,
                                         interval(st['final_test']), interval(st['final_train']),
                                         f"{st['inside'][0]} / {st['inside'][1]} of {st['inside'][2]}",
                                         f"{count('+')} / {count('−')} / {count('0')}", sign_runs(signs)]) + ' |')
            for endpoint in ('primary', 'final_test', 'final_train'):
                e = st[endpoint]
                diff_rows.append({'size': s, 'row': key[0], 'reference': key[1], 'endpoint': endpoint, 'n': e['n'],
                                  'mean': e['mean'], 'sd': e['sd'],
                                  'ci_low': None if e['half'] is None else e['mean'] - e['half'],
                                  'ci_high': None if e['half'] is None else e['mean'] + e['half'], 'p': e['p'],
                                  'holm_rejected': rejected.get(key) if endpoint == 'primary' else None})
            along_rows += [{'size': s, 'row': key[0], 'reference': key[1], 'iter': i, 'n': x['n'], 'mean': x['mean'],
                            'ci_low': None if x['half'] is None else x['mean'] - x['half'],
                            'ci_high': None if x['half'] is None else x['mean'] + x['half']} for i, x in st['along']]
        md += ['', f'## {s}: how input-dependent the masks are (mask_analysis.py on each run\'s best weights, val_test)', '']
        learned = {r: v for r, v in done.items() if row_config(r).get('model_type') == 'learned'}
        md += mask_lines(learned)
        mask_claims += mask_claim_lines(s, learned)
        md += ['', f'![{s}: the mask analysis, one dot per seed](masks_{s}.png)', '',
               f'![{s}: differences along training](along_{s}.png)']
        if not quiet:
            mask_chart(learned, os.path.join(results_dir, f'masks_{s}.png'), f'{s}: how input-dependent the masks are')
            along_chart(stats, os.path.join(results_dir, f'along_{s}.png'), f'{s}: row − reference along training')
    if claims or mask_claims:
        md += ['', "## The write-up's claims, by the wording rule declared in REPORT.md", '',
               f'"Supported" / "contradicted": the primary difference survives Holm over its size\'s family, in the '
               f'direction the claim predicts / the other; claim 2 is "competitive" when the 95% interval lies below '
               f'+{MARGIN:g} nats. Otherwise "not distinguishable": the interval\'s bounds are the largest effects the '
               f'data leave open. Claim 4 (shift 0 best) is not rerun in v3.', '',
               '| claim | size | difference | Δ primary [95% CI] (n) | p | verdict | rows whose best eval is the last (most seeds) |',
               '|---|---|---|---|---|---|---|', *claims]
    if mask_claims:
        md += ['', '| does the mask depend on the input? | size | majority per channel − CE [95% CI] (n) | '
               'lowest keep (eval; any run, any layer) | verdict |', '|---|---|---|---|---|', *mask_claims]
    directions = direction_lines(per_size)
    if directions:
        md += ['', '| direction with size: row − reference | S1 Δ primary [95% CI] (n) | S2 Δ primary [95% CI] (n) | '
               'sign of the means |', '|---|---|---|---|', *directions]
    os.makedirs(results_dir, exist_ok=True)

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
    for name, records in (('results.csv', per_run), ('differences.csv', diff_rows), ('along.csv', along_rows)):
        if records:
            write_csv(os.path.join(results_dir, name), records)
    if not quiet:
        print('\n'.join(md), flush=True)
    return n_done


# ----------------------------------------------------------------------------- main

def shape_params(size_name):
    """{'learned': parameters, 'baseline': parameters} of a size's two shapes."""
    return {kind: cost(dict(row_config(row), **run_settings(row, size_name, seed0, 1e-3), vocab_size=vocab_size))['params']
            for kind, row in (('learned', METHOD), ('baseline', 'baseline'))}


def check_matching():
    """At each size, the learned and plain shapes' parameter counts must agree within 1% as in the seed."""
    for s in ('S1', 'S2'):
        counts = shape_params(s)
        gap = counts['learned'] / counts['baseline'] - 1
        print(f"{s} parameters: learned {counts['learned']:,} ({size(s)['learned']}), baseline {counts['baseline']:,} "
              f"({size(s)['baseline']}): {gap:+.2%}")
        if abs(gap) > 0.01:
            fail(f"at {s} the learned and plain shapes differ by {gap:+.2%} in parameters, more than 1%: adjust "
                 f"the shapes")


# a list of distinct finite numbers above (or from) 0
DISTINCT = ("len(set(map(float, x.split(',')))) == len(x.split(',')) and "
            "all({low} float(v) < float('inf') for v in x.split(','))")
RULES = {
    'stages': ("len(x) > 0 and len(set(x.split(','))) == len(x.split(',')) and set(x.split(',')) <= "
               "{'tune', 's1', 'pilot', 's2'}", "a comma-separated list of tune, s1, pilot, s2, each once"),
    'seeds': 'x >= 1', 'seeds2': 'x >= 1', 'tune_seeds': 'x >= 1', 'seed0': 'x >= 0', 'tune_seed0': 'x >= 0',
    'pilot_seed': 'x >= 0', 'max_iters': 'x >= 1', 'eval_interval': 'x >= 1', 'warmup_iters': 'x >= 0',
    'train_tokens': 'x >= 1', 'train_tokens2': 'x >= 1', 'val_tokens': 'x >= 0',
    'vocab_size': ('257 <= x <= 50257', "257..50257 (the 256 byte tokens + merges + <|endoftext|>)"),
    'lrs': (DISTINCT.format(low='0 <'), "distinct positive finite learning rates, comma-separated, e.g. 1e-3,2e-3,4e-3"),
    'penalties': (DISTINCT.format(low='0 <='), "distinct finite penalty weights >= 0, comma-separated, e.g. 0,0.03,0.1,0.3"),
    'pilot_factors': (DISTINCT.format(low='0 <'), "distinct positive finite factors, comma-separated, e.g. 0.5,1,2"),
    'lengthen': 'x >= 1', 'jobs': 'x >= 1', 'executor': "x in ('local', 'slurm', 'submitit_local')",
    'tuned': (f"len(x) > 0 and set(x.split(',')) <= set({CONFIGS!r})", "a comma-separated list of config names"),
    'rows': (f"len(x) > 0 and set(x.split(',')) <= set({CONFIGS + list(ALIASES)!r})",
             f"a comma-separated list of config names or {', '.join(ALIASES)}"),
    'rows2': (f"set(x.split(',')) <= set({CONFIGS + list(ALIASES) + ['best_dropout']!r})",
              f"a comma-separated list of config names, {', '.join(ALIASES)} or best_dropout"),
    'pilot_rows': (f"len(x) > 0 and set(x.split(',')) <= set({CONFIGS!r})", "a comma-separated list of config names"),
}


def check_rows():
    """Every row of a main stage has a rate: its own (tuned) or the one it inherits; no row twice."""
    have = tuned.split(',')
    for name, value in (('tuned', tuned), ('rows', rows), ('rows2', rows2), ('pilot_rows', pilot_rows)):
        listed = value.split(',')
        if len(set(listed)) < len(listed):
            fail(f"{name} names a row twice: {value}")
        for row in listed:
            if row == 'best_dropout':
                if not any(r in have for r in DROPOUT_ROWS):
                    fail(f"{name} has best_dropout but tuned has no dropout row ({', '.join(DROPOUT_ROWS)})")
            elif row not in have and INHERITED.get(row) not in have:
                fail(f"{name} has {row}, which has no learning rate: "
                     + (f"add {INHERITED[row]}, whose rate it takes, to tuned" if row in ALIASES else
                        f"add it to tuned or tune {INHERITED[row]}, whose rate it takes" if row in INHERITED else
                        "add it to tuned"))
    if any(r == 'learned_random' for r in rows.split(',') + rows2.split(',')) and METHOD not in have:
        fail(f"learned_random keeps at the rate of the tuned {METHOD}: add {METHOD} to tuned")


def main():
    try:
        globals().update(configure({k: globals()[k] for k in (
            'stages', 'tuned', 'rows', 'rows2', 'pilot_rows', 'seed0', 'seeds', 'seeds2', 'tune_seed0', 'tune_seeds', 'lrs', 'penalties', 'pilot_factors',
            'pilot_seed', 'lengthen', 'max_iters', 'eval_interval', 'warmup_iters', 'train_tokens', 'train_tokens2', 'val_tokens',
            'vocab_size', 'learned_shape', 'baseline_shape', 'learned_shape2', 'baseline_shape2', 'train_args',
            'data_dir', 'out_root', 'results_dir', 'jobs', 'executor', 'slurm_args', 'commit', 'report_only')},
            sys.argv[1:], __file__, __doc__, RULES))
    except ConfigError as e:
        fail(str(e))
    except ValueError as e:  # a list rule (lrs, penalties, pilot_factors) met something that is not a number
        bad = str(e).rpartition(': ')[2].strip("'")
        which = next((a.lstrip('-').partition('=')[0] for a in sys.argv[1:] if bad and bad in a), 'a list option')
        fail(f"{which}: {bad!r} is not a number; give comma-separated numbers, e.g. --lrs=1e-3,2e-3,4e-3")
    check_rows()
    if os.path.exists(results_dir) and not os.path.isdir(results_dir):
        fail(f"--results_dir={results_dir} is a file; give a folder (created if missing)")
    if report_only:
        report()
        return
    check_matching()
    for s in ('S1', 'S2'):
        prepare_data(size(s)['tokens'])
    os.makedirs(results_dir, exist_ok=True)
    sweep()
    report()
    if commit:
        git_commit('study v3: the report and its charts')


if __name__ == '__main__':
    main()
