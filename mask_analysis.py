"""
How much do a learned model's masks depend on the input? For any checkpoint of model.py (every mask
class: the method, its variants, a user's own) and a split of its data, per layer:

- variance: the share of M's variance that lies within channels (across tokens) and between channels
  (law of total variance: within + between = 1). A fixed pruning pattern is all "between"; a mask that
  does not vary at all (var(M) = 0, e.g. RandomMask's one fixed probability) has no shares (None).
- keep rates: the distribution of each channel's eval keep rate (the share of tokens where its eval mask
  R is 1) over the split, and the share of channels whose eval mask is constant over it (always kept or
  always dropped). Soft masks (R = M, e.g. SoftMask) have no 0/1 mask: their keep rates and mutual
  information read R as [M >= 0.5], and they have no sampled test (None).
- mutual information (bits) between a channel's eval mask and the current token id, averaged over
  channels, against the same estimate with the token ids shuffled over positions (the plug-in estimate's
  bias; ids beyond the most frequent `top_tokens` are pooled into one).
- functional test: cross-entropy of the split with the masks as they are; with each channel's mask
  replaced by its majority value over the split (a fixed pruning pattern); by its mean R over the
  split (a fixed soft mask: the keep rate, or a soft mask's mean M); and with masks sampled from
  Bernoulli(M), the mean cross-entropy over `draws` draws (not for soft masks).
  If the majority pattern loses nothing, what the masks see does not matter for the loss.

$ python mask_analysis.py --out_dir=out/quick_learned
$ python mask_analysis.py --out_dir=out/learned_shift0 --checkpoint=best.pt --split=train --max_windows=200

Prints a table and writes out_dir/mask_analysis_<checkpoint>_<split>.json (or --out).
"""

import json
import os
import sys

import torch

from configurator import ConfigError, configure
from runtime import (CheckpointError, RuntimeSetupError, every_window, load_model, pick_device, save_json,
                     setup_device, val_halves)

# -----------------------------------------------------------------------------
out_dir = 'out'  # the run folder train.py wrote
checkpoint = 'ckpt.pt'  # 'ckpt.pt', 'best.pt' or weights-only 'model.pt' in out_dir
data_dir = ''  # where the run's dataset lives ('': the data_dir in out_dir/config.json)
dataset = ''  # the prepared dataset ('': the run's own, from out_dir/config.json)
split = 'val'  # 'train', 'val', or a half of val's documents: 'val_select' or 'val_test' (train.py's eval_halves)
max_windows = 0  # non-overlapping windows of the split to use, spread over it (0: all)
batch_size = 16  # windows per forward pass
top_tokens = 1024  # token ids kept apart for the mutual information; rarer ones are pooled
draws = 4  # sampled-mask draws for the functional test
seed = 1337  # the shuffled ids and the sampled masks
device = 'auto'  # 'auto' = cuda > mps > cpu; or e.g. 'cpu'
out = ''  # the JSON report ('': out_dir/mask_analysis_<checkpoint>_<split>.json)
# -----------------------------------------------------------------------------
RULES = {'split': "x in ('train', 'val', 'val_select', 'val_test')", 'max_windows': 'x >= 0', 'batch_size': 'x >= 1', 'top_tokens': 'x >= 1',
         'draws': 'x >= 1', 'checkpoint': ('len(x) > 0', 'a file name in out_dir')}


def fail(message, code=1):
    print(f"mask_analysis.py: error: {message}", file=sys.stderr)
    sys.exit(code)


def learned_dropouts(model):
    return [block.learned_dropout for block in model.transformer.h]


class Recorder:
    """Forward hooks on every layer's LearnedDropout: record (M, R) of each call (on the CPU, where the
    statistics accumulate), or replace R by a fixed per-channel mask (the functional test). The model's
    code is not touched."""

    def __init__(self, model):
        self.records, self.fixed, self.recording = [], None, True
        self.handles = [ld.register_forward_hook(self.hook(i)) for i, ld in enumerate(learned_dropouts(model))]

    def hook(self, layer):
        def run(module, inputs, output):
            y, m, r = output
            if self.fixed is not None:  # (n_layer, C): the same mask for every token
                r = self.fixed[layer].to(y.device, y.dtype).expand_as(r)
                return inputs[0] * r, m, r
            if self.recording:
                self.records.append((layer, m.detach().float().cpu(), r.detach().float().cpu()))
        return run


@torch.no_grad()
def analyse(model, windows, n_layer, vocab_size):
    """Every statistic of the module docstring, from the (x, y) windows (a list of batches)."""
    C = model.config.n_embd
    rec = Recorder(model)
    ids = torch.cat([x.flatten() for x, _ in windows]).cpu()  # the current token at every position
    freq = torch.bincount(ids, minlength=vocab_size)
    top = freq.argsort(descending=True)[:top_tokens]
    bucket = torch.full((vocab_size,), len(top), dtype=torch.long)
    bucket[top] = torch.arange(len(top))  # token id -> its bucket; the rest share the last one
    K = len(top) + 1
    gen = torch.Generator().manual_seed(seed)
    shuffled = bucket[ids][torch.randperm(len(ids), generator=gen)]
    m_sum, m_sq, keep, r_sum = (torch.zeros(n_layer, C, dtype=torch.float64) for _ in range(4))
    counts = torch.zeros(n_layer, 2, C, K, 2, dtype=torch.float64)  # (layer, real/shuffled ids, channel, id, R)
    n, pos, ce_sum, soft = 0, 0, 0.0, False
    for x, y in windows:
        rec.records.clear()
        _, loss = model(x, y)
        ce_sum += loss.item() * x.numel()
        b = bucket[x.flatten().cpu()]
        s = shuffled[pos:pos + x.numel()]
        pos += x.numel()
        for layer, m, r in rec.records:
            m, r = m.reshape(-1, C).double(), r.reshape(-1, C)
            if not soft and not ((r == 0) | (r == 1)).all():
                soft = True  # R = M: no 0/1 mask
            hard = (m >= 0.5) if soft else (r == 1)  # (N, C) the eval mask as 0/1
            m_sum[layer] += m.sum(0)
            m_sq[layer] += (m * m).sum(0)
            keep[layer] += hard.sum(0).double()
            r_sum[layer] += r.double().sum(0)
            for j, ids_j in enumerate((b, s)):
                idx = (ids_j.unsqueeze(1) * 2 + hard.long()).T  # (C, N): id bucket and R in one index
                counts[layer, j].view(C, -1).scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
        n += x.numel()
    mean = m_sum / n  # (layer, C)
    within = (m_sq / n - mean ** 2).mean(1)  # mean over channels of the variance across tokens
    between = mean.var(1, unbiased=False)  # variance of the channel means
    total = within + between
    rates = keep / n  # (layer, C) eval keep rate of each channel
    mi = mutual_information(counts)  # (layer, 2): real ids, shuffled ids

    # the functional test: the same windows with masks fixed per channel, or sampled
    rec.recording = False
    out = {'ce': ce_sum / n}
    for name, fixed in (('ce_majority', (rates >= 0.5).float()), ('ce_mean', (r_sum / n).float())):
        rec.fixed = fixed
        out[name] = sum(model(x, y)[1].item() * x.numel() for x, y in windows) / n
    rec.fixed = None
    out['ce_sampled'] = None  # soft masks are not sampled
    if hasattr(model, 'set_mask_mode') and not soft:
        model.set_mask_mode('stochastic')
        torch.manual_seed(seed)
        out['ce_sampled'] = sum(model(x, y)[1].item() * x.numel() for x, y in windows for _ in range(draws)) / (n * draws)
        model.set_mask_mode('deterministic')
    for h in rec.handles:
        h.remove()
    layers = []
    for i in range(n_layer):
        q = torch.quantile(rates[i], torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)).tolist()
        varies = total[i] > 1e-12  # else the shares are 0 / 0 (and E[M^2] - E[M]^2 rounding)
        layers.append({'layer': i, 'within_share': (within[i] / total[i]).item() if varies else None,
                       'between_share': (between[i] / total[i]).item() if varies else None, 'm_var': total[i].item(),
                       'keep': rates[i].mean().item(), 'keep_quantiles': dict(zip(('0', '10', '50', '90', '100'), q)),
                       'constant_share': ((rates[i] == 0) | (rates[i] == 1)).double().mean().item(),
                       'mi_bits': mi[i, 0].item(), 'mi_null_bits': mi[i, 1].item()})
    return dict(out, tokens=n, soft_masks=soft, layers=layers)


def mutual_information(counts):
    """Plug-in mutual information (bits) between R and the id bucket, per (layer, ids), averaged over
    channels, from counts (layer, ids, C, K, 2)."""
    n = counts.sum((-1, -2), keepdim=True)  # (layer, ids, C, 1, 1)
    p = counts / n
    p_id = p.sum(-1, keepdim=True)  # (.., K, 1)
    p_r = p.sum(-2, keepdim=True)  # (.., 1, 2)
    terms = torch.where(p > 0, p * torch.log2(p / (p_id * p_r)), torch.zeros_like(p))
    return terms.sum((-1, -2)).mean(-1)  # (layer, ids)


def main(argv):
    cfg = {k: globals()[k] for k in ('out_dir', 'checkpoint', 'data_dir', 'dataset', 'split', 'max_windows',
                                     'batch_size', 'top_tokens', 'draws', 'seed', 'device', 'out')}
    try:
        cfg = configure(cfg, argv, __file__, __doc__, RULES)
        dev = pick_device(cfg['device'])
        model, ckpt = load_model(os.path.join(cfg['out_dir'], cfg['checkpoint']), dev)
    except (ConfigError, RuntimeSetupError) as e:
        fail(str(e), code=2)
    except CheckpointError as e:
        fail(str(e))
    globals().update(cfg)
    setup_device(dev.split(':')[0])
    if not hasattr(model, 'set_mask_mode'):
        fail(f"{out_dir} holds a {ckpt['model_type']} model: the analysis needs a learned model (model.py)", code=2)
    run = ckpt.get('config') or {}
    folder = os.path.join(data_dir or run.get('data_dir', 'data'), dataset or run.get('dataset', ''))
    path = os.path.join(folder, f"{split.partition('_')[0]}.bin")
    if not os.path.isfile(path):
        fail(f"no {path}: give the run's data with --data_dir and --dataset")
    T = model.config.block_size
    data = path
    if split.startswith('val_'):  # the same halves of val's documents as train.py's eval_halves
        try:
            with open(os.path.join(folder, 'meta.json')) as f:
                eot = json.load(f).get('eot_token')
            data = val_halves(path, eot, T)[split]
        except (OSError, ValueError, AttributeError) as e:
            fail(f"cannot read {folder}/meta.json ({e}): the halves need its eot_token")
        except RuntimeSetupError as e:
            fail(str(e))
    windows = list(every_window(data, T, batch_size, max_windows or None))
    if not windows:
        fail(f"{path} is shorter than one window of {T + 1} tokens")
    windows = [(x.to(dev), y.to(dev)) for x, y in windows]
    if max(int(x.max()) for x, _ in windows) >= model.config.vocab_size:
        fail(f"{path} holds ids beyond the model's vocabulary ({model.config.vocab_size}): not this run's data")
    model.eval()
    result = analyse(model, windows, model.config.n_layer, model.config.vocab_size)
    result.update(out_dir=out_dir, checkpoint=checkpoint, split=split, data=path, iter=ckpt.get('iter_num'),
                  mask_class=type(learned_dropouts(model)[0]).__name__)
    print(f"{out_dir}/{checkpoint} (iter {result['iter']}, {result['mask_class']}), {split}: {result['tokens']:,} tokens")
    print(f"{'layer':>5} {'within':>7} {'between':>7} {'keep':>6} {'const':>6} {'keep p10/p50/p90':>18} "
          f"{'MI bits':>8} {'null':>8}")
    share = lambda v: '-' if v is None else f'{v:.3f}'  # None: M does not vary
    for r in result['layers']:
        q = r['keep_quantiles']
        print(f"{r['layer']:>5} {share(r['within_share']):>7} {share(r['between_share']):>7} {r['keep']:>6.3f} "
              f"{r['constant_share']:>6.3f} {q['10']:>6.2f}/{q['50']:.2f}/{q['90']:.2f} "
              f"{r['mi_bits']:>8.4f} {r['mi_null_bits']:>8.4f}")
    sampled = ('none (soft masks)' if result['ce_sampled'] is None
               else f"{result['ce_sampled']:.4f} ({draws} draws)")
    print(f"cross-entropy: masks as they are {result['ce']:.4f}; majority per channel {result['ce_majority']:.4f}; "
          f"mean R per channel {result['ce_mean']:.4f}; sampled {sampled}")
    dst = out or os.path.join(out_dir, f"mask_analysis_{os.path.splitext(checkpoint)[0]}_{split}.json")
    try:
        save_json(result, dst, 'report')
    except RuntimeSetupError as e:
        fail(str(e))
    print(f"wrote {dst}")


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except BrokenPipeError:  # e.g. piped into head
        sys.exit(0)
