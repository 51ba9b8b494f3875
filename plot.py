"""
Charts from training runs (out_dir/metrics.jsonl) and from a checkpoint's masks.

$ python plot.py out/quick_learned out/quick_baseline            # curves.png/svg, keep_layers_*.png/svg
$ python plot.py out/quick_learned --mask_text="The Moon is Earth's only natural satellite."

Writes into --out (default: plots/):
- curves: train and val cross-entropy (eval mode), the penalty mean(M^2/2) (the write-up's "L1 norm")
  and the keep fraction of the training masks over steps, every run overlaid;
- keep_layers_<run>: per-layer keep fraction over steps (layer x step heatmap) of each learned run;
- masks_<run> (with --mask_text): the deterministic mask's keep fraction per token and layer;
- bands (with --bands): runs grouped by name (their config file), each group's mean +- SD over its runs
  (seeds) of val and train cross-entropy, the keep fraction and the MoE load entropy.
"""

import argparse
import json
import os
import re
import sys

import matplotlib

matplotlib.use('Agg')
matplotlib.rcParams['svg.hashsalt'] = 'plot.py'  # the same data gives the same files (no churn in results/)
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402


class PlotError(Exception):
    pass


def load_run(out_dir):
    """(name, eval records, training records) of a run folder."""
    path = os.path.join(out_dir, 'metrics.jsonl')
    if not os.path.exists(path):
        raise PlotError(f"no metrics file {path}: is {out_dir} a run folder written by train.py?")
    from runtime import RuntimeSetupError, read_jsonl
    try:
        records = read_jsonl(path, warn=lambda msg: print(msg, file=sys.stderr))
    except RuntimeSetupError as e:
        raise PlotError(str(e))
    except OSError as e:  # a directory, or a file this user cannot read
        raise PlotError(f"cannot read {path}: {e.strerror or e}; it must be the run's metrics file")
    name = os.path.basename(os.path.normpath(out_dir))
    config_path = os.path.join(out_dir, 'config.json')
    if os.path.exists(config_path):
        try:
            with open(config_path) as f:
                conf = json.load(f)
        except (OSError, ValueError) as e:
            raise PlotError(f"cannot read {config_path} ({type(e).__name__}): it names the run; fix or remove it")
        if not isinstance(conf, dict):
            raise PlotError(f"{config_path} is not a JSON object: it names the run; fix or remove it")
        name = str(conf.get('wandb_run_name') or name)
    records = [r for r in records if isinstance(r, dict) and isinstance(r.get('iter'), int)]
    # a diverged run logs NaN or inf: those points are left out of the lines (with a word), not drawn as gaps
    bad = [r['iter'] for r in records if any(isinstance(v, float) and not np.isfinite(v) for v in r.values())]
    if bad:
        print(f"plot.py: warning: {path}: losses that are not finite numbers at {len(bad)} record(s) from iter "
              f"{bad[0]}; those points are not drawn", file=sys.stderr)
        records = [{k: v for k, v in r.items() if not (isinstance(v, float) and not np.isfinite(v))} for r in records]
    return name, [r for r in records if 'val/loss' in r], [r for r in records if 'loss' in r]


def unique_names(runs, out_dirs):
    """Run names from their configs; the folder name where two runs share a config."""
    names = [r[0] for r in runs]
    return [n if names.count(n) == 1 else os.path.basename(os.path.normpath(d)) for n, d in zip(names, out_dirs)]


def save(fig, out, stem):
    """The figure as out/stem.png and .svg, each written to a temporary and renamed (a full disk leaves the
    previous chart whole)."""
    from runtime import RuntimeSetupError, atomic_write
    stem = re.sub(r'[^\w.+=-]', '_', stem)  # run names may hold '/' or spaces: keep files inside out
    if len(stem) > 120:  # a file name has at most 255 bytes: a long run name is cut, its hash keeps it apart
        import hashlib
        stem = f"{stem[:100]}-{hashlib.sha1(stem.encode()).hexdigest()[:8]}"
    paths = [os.path.join(out, f'{stem}.{ext}') for ext in ('png', 'svg')]
    try:
        for p in paths:
            atomic_write(p, lambda tmp, ext=p[-3:]: fig.savefig(
                tmp, format=ext, dpi=120, bbox_inches='tight', metadata={'Date': None} if ext == 'svg' else None), 'chart')
    except RuntimeSetupError as e:
        raise PlotError(str(e))
    finally:
        plt.close(fig)
    return paths


def run_colors(names):
    """{name: colour}, fixed before drawing: a panel where some runs have no line (a baseline has no keep
    fraction) must not shift the colours of the others. Up to 10 hues, then their light shades."""
    if len(names) <= 10:
        palette = plt.get_cmap('tab10').colors
    else:
        tab20 = plt.get_cmap('tab20').colors
        palette = tab20[0::2] + tab20[1::2]
    return {n: palette[i % len(palette)] for i, n in enumerate(names)}


def plot_curves(runs, out):
    panels = [('train/loss', 'evals', 'train cross-entropy (eval mode; thin: each logged step, training mode)'),
              ('val/loss', 'evals', 'val cross-entropy (eval mode)'),
              ('penalty', 'steps', 'penalty mean(M²/2), the "L1 norm"'),
              ('keep', 'steps', 'keep fraction (training masks)')]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    last_iter = max(r['iter'] for _, evals, steps in runs for r in evals + steps)
    color = run_colors([name for name, _, _ in runs])
    for ax, (key, kind, title) in zip(axes.flat, panels):
        tail = []
        for name, evals, steps in runs:
            recs = [r for r in (evals if kind == 'evals' else steps) if key in r]
            if recs:
                ax.plot([r['iter'] for r in recs], [r[key] for r in recs], label=name, color=color[name],
                        marker='o' if kind == 'evals' and len(recs) < 30 else None, markersize=3)
                tail += [r[key] for r in recs if r['iter'] >= 0.1 * last_iter]
            if key == 'train/loss':  # the per-step training loss (masks and dropout on) beside the evaluations
                ce = [r for r in steps if 'ce' in r or 'loss' in r]
                if ce:
                    ax.plot([r['iter'] for r in ce], [r.get('ce', r.get('loss')) for r in ce], color=color[name],
                            lw=0.8, alpha=0.4, label=f'_{name}')  # '_': not in the legend
                    tail += [r.get('ce', r.get('loss')) for r in ce if r['iter'] >= 0.1 * last_iter]
        if kind == 'evals' and tail:  # zoom to the last 90%: the loss at init would flatten the differences
            pad = 0.05 * (max(tail) - min(tail) or 1)
            ax.set_ylim(min(tail) - pad, max(tail) + pad)
            title += ', last 90% of training'
        ax.set_xlim(0, last_iter * 1.02 or 1)  # every panel covers the whole run, logged steps or not
        ax.set_title(title, fontsize=10)
        ax.set_xlabel('iteration')
        ax.set_ylabel(title.split(' (')[0].split(',')[0])
        ax.grid(alpha=0.3)
        if not ax.lines:
            ax.text(0.5, 0.5, 'no learned run', ha='center', va='center', transform=ax.transAxes)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    rows = -(-len(labels) // 4)
    fig.tight_layout(rect=(0, 0.035 * rows, 1, 1))  # leave a band at the bottom for the legend
    fig.legend(handles, labels, loc='lower center', ncol=min(4, len(labels)))
    return save(fig, out, 'curves')


def layer_heatmap(grid, figsize, cmap, xlabel, title, **imshow_kw):
    """A (layers, x) grid of keep fractions in [0, 1], layer 0 at the bottom."""
    fig, ax = plt.subplots(figsize=figsize)
    im = ax.imshow(grid, aspect='auto', origin='lower', vmin=0, vmax=1, cmap=cmap, interpolation='nearest', **imshow_kw)
    ax.set_xlabel(xlabel)
    ax.set_ylabel('layer')
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label='keep fraction')
    return fig, ax


def plot_keep_layers(name, steps, out):
    recs = [r for r in steps if isinstance(r.get('keep_per_layer'), list)]
    n_layer = max((len(r['keep_per_layer']) for r in recs), key=[len(r['keep_per_layer']) for r in recs].count)
    if any(len(r['keep_per_layer']) != n_layer for r in recs):  # a run resumed with another depth, or edited
        print(f"plot.py: warning: {name}: keep_per_layer has another length than {n_layer} in some records; "
              f"those are not drawn", file=sys.stderr)
        recs = [r for r in recs if len(r['keep_per_layer']) == n_layer]
    grid = np.array([r['keep_per_layer'] for r in recs], dtype=float).T  # (layers, logged steps)
    iters = [r['iter'] for r in recs]
    half = (iters[-1] - iters[0]) / (2 * (len(iters) - 1)) if len(iters) > 1 else 0.5  # columns centred on their step
    fig, ax = layer_heatmap(grid, (10, 0.25 * grid.shape[0] + 2), 'viridis', 'iteration',
                            f'{name}: keep fraction of the training masks per layer',
                            extent=(iters[0] - half, iters[-1] + half, -0.5, grid.shape[0] - 0.5))
    return save(fig, out, f'keep_layers_{name}')


def token_layer_keep(out_dir, text, checkpoint):
    """(token strings, (layers, tokens) keep fraction of the deterministic masks) for text."""
    import torch
    from runtime import CheckpointError, load_model
    from tokenizer import TokenizerError, get_codec
    try:
        model, ckpt = load_model(os.path.join(out_dir, checkpoint))
    except CheckpointError as e:
        raise PlotError(str(e))
    if not hasattr(model, 'set_mask_mode'):  # no learned masks
        raise PlotError(f"{out_dir} is a {ckpt['model_type']} run: mask charts need a learned model")
    try:
        encode, decode = get_codec(model.config.vocab_size, ckpt.get('tokenizer_cut'))
    except TokenizerError as e:
        raise PlotError(str(e))
    ids = encode(text)[:model.config.block_size]
    if not ids:
        raise PlotError("--mask_text is empty")
    with torch.no_grad():
        _, _, rs = model.hidden(torch.tensor([ids]))
    keep = torch.stack([r[0].mean(-1) for r in rs])  # (layers, tokens): share of kept channels
    return [decode([i]) for i in ids], keep.numpy()


def plot_masks(name, tokens, keep, out):
    fig, ax = layer_heatmap(keep, (max(6, 0.3 * len(tokens) + 2), 0.25 * keep.shape[0] + 2.5), 'magma', 'token',
                            f'{name}: kept share of MLP channels per token (deterministic masks)')
    ax.set_xticks(range(len(tokens)))
    ax.set_xticklabels([repr(t)[1:-1] for t in tokens], rotation=90, fontsize=8)
    return save(fig, out, f'masks_{name}')


def mean_sd_curve(records_per_run, key):
    """(iters, mean, SD) of key over runs at the iterations every run logged it (SD 0 for one run)."""
    per_run = [{r['iter']: r[key] for r in recs if key in r} for recs in records_per_run]
    iters = sorted(set.intersection(*(set(d) for d in per_run))) if per_run else []
    values = np.array([[d[i] for i in iters] for d in per_run])  # (runs, iters)
    sd = values.std(0, ddof=1) if len(per_run) > 1 else np.zeros(len(iters))
    return np.array(iters), values.mean(0) if iters else np.array([]), sd


def plot_bands(groups, out):
    """groups: [(name, [(eval records, training records) of each run])]. One line per group, the mean over
    its runs, in a band of +- one standard deviation."""
    panels = [('val/loss', 0, 'val cross-entropy (eval mode)'), ('train/loss', 0, 'train cross-entropy (eval mode)'),
              ('keep', 1, 'keep fraction (training masks)'), ('load_entropy', 1, 'MoE expert load entropy (nats)')]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    last_iter = max(r['iter'] for _, runs in groups for run in runs for recs in run for r in recs)
    color = run_colors([name for name, _ in groups])
    for ax, (key, kind, title) in zip(axes.flat, panels):
        tail = []
        for name, runs in groups:
            iters, mean, sd = mean_sd_curve([run[kind] for run in runs], key)
            if len(iters):
                ax.plot(iters, mean, label=f'{name} (n={len(runs)})', color=color[name])
                ax.fill_between(iters, mean - sd, mean + sd, color=color[name], alpha=0.2, linewidth=0)
                late = iters >= 0.1 * last_iter
                tail += list((mean - sd)[late]) + list((mean + sd)[late])
        if kind == 0 and tail:  # as plot_curves: zoom to the last 90%
            pad = 0.05 * (max(tail) - min(tail) or 1)
            ax.set_ylim(min(tail) - pad, max(tail) + pad)
            title += ', last 90% of training'
        ax.set_xlim(0, last_iter * 1.02 or 1)  # every panel covers the whole run, logged steps or not
        ax.set_title(title, fontsize=10)
        ax.set_xlabel('iteration')
        ax.grid(alpha=0.3)
        if not ax.lines:
            ax.text(0.5, 0.5, 'no such run', ha='center', va='center', transform=ax.transAxes)
    handles, labels = [], []
    for ax in axes.flat:  # every group once, whichever panel has it
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    rows = -(-len(labels) // 4)
    fig.suptitle('mean ± SD over the runs (seeds) of each group')
    fig.tight_layout(rect=(0, 0.035 * rows, 1, 1))
    fig.legend(handles, labels, loc='lower center', ncol=min(4, len(labels)))
    return save(fig, out, 'bands')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip())
    p.add_argument('out_dirs', nargs='+', metavar='OUT_DIR', help='run folders written by train.py')
    p.add_argument('--out', default='plots', help='where the charts go (default: plots)')
    p.add_argument('--mask_text', help='text (or FILE:path) for the token x layer mask chart of each learned run')
    p.add_argument('--checkpoint', default='ckpt.pt', help='checkpoint for --mask_text: ckpt.pt or best.pt')
    p.add_argument('--bands', action='store_true',
                   help='group the runs by name (config file) and draw mean +- SD bands over each group (bands.png)')
    args = p.parse_args(argv)
    try:
        if args.mask_text is not None and not args.mask_text.strip():
            raise PlotError("--mask_text is empty: give a sentence, or FILE:path")
        if args.mask_text and args.mask_text.startswith('FILE:'):
            try:
                with open(args.mask_text[5:], encoding='utf-8') as f:
                    args.mask_text = f.read()
            except OSError as e:
                raise PlotError(f"cannot read {args.mask_text[5:]}: {e.strerror}")
            except UnicodeDecodeError:
                raise PlotError(f"{args.mask_text[5:]} is not UTF-8 text")
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as e:
            raise PlotError(f"cannot write to {args.out}: {e.strerror}")
        if args.mask_text:
            for d in args.out_dirs:
                name = os.path.basename(os.path.normpath(d))
                tokens, keep = token_layer_keep(d, args.mask_text, args.checkpoint)
                print('wrote', *plot_masks(name, tokens, keep, args.out))
            return
        runs = [load_run(d) for d in args.out_dirs]
        if args.bands:
            groups = {}
            for name, evals, steps in runs:
                groups.setdefault(name, []).append((evals, steps))
            if not any(e or s for runs_ in groups.values() for e, s in runs_):
                raise PlotError("the metrics files hold no records yet")
            print('wrote', *plot_bands(list(groups.items()), args.out))
            return
        names = unique_names(runs, args.out_dirs)
        runs = [(n, e, s) for n, (_, e, s) in zip(names, runs)]
        if not any(e or s for _, e, s in runs):
            raise PlotError("the metrics files hold no records yet")
        print('wrote', *plot_curves(runs, args.out))
        for name, _, steps in runs:
            if any('keep_per_layer' in r for r in steps):
                print('wrote', *plot_keep_layers(name, steps, args.out))
    except PlotError as e:
        sys.exit(f"plot.py: error: {e}")


if __name__ == '__main__':
    main()
