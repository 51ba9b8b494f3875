"""
The GPT with LearnedDropout: each block masks its MLP output with a binary mask that a
small causal attention computes from that very output (METHOD.md sections 1-4:
the module, its placement, the objective and the logged statistics).

    a = h + Attn(LN1(h))
    f = MLP(LN2(a))
    h = a + f * R,   R ~ round(M),   M = 0.5 * cos(attend(f) + shift) + 0.5

Everything that is not LearnedDropout comes from baseline_model.py.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from baseline_model import GPTConfig as BaselineConfig, GPT as BaselineGPT
from baseline_model import Block, KVCache, attend

__all__ = ['GPTConfig', 'LearnedDropout', 'LearnedBlock', 'GPT', 'KVCache', 'MASK_STATS']


@dataclass
class GPTConfig(BaselineConfig):
    shift_init: float = 0.0  # initial value of every channel of the shift b, in [0, pi]
    dropout_n_head: Optional[int] = None  # heads of the mask attention (None: n_head)
    penalty_coeff: float = 0.1  # weight of mean(M^2/2) in the training loss (0: no penalty term)

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.shift_init <= math.pi:
            raise ValueError(f"shift_init must be in [0, pi] (the write-up's B), got {self.shift_init}")
        n = self.dropout_n_head or self.n_head
        if self.n_embd % n:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by dropout_n_head ({n})")
        if self.dropout_n_head is not None and self.dropout_n_head < 1:
            raise ValueError(f"dropout_n_head must be >= 1 or None (= n_head), got {self.dropout_n_head}")
        if self.penalty_coeff < 0:
            raise ValueError(f"penalty_coeff must be >= 0, got {self.penalty_coeff}")
        if self.dropout != 0:
            raise ValueError(f"dropout must be 0 in the learned model (its masks replace standard dropout), got "
                             f"{self.dropout}; for standard dropout use model_type='baseline'")


class LearnedDropout(nn.Module):
    """Input-dependent binary mask: x -> (x * R, M, R).

    M = 0.5 * cos(z + shift) + 0.5 with z the causal self-attention of x (no output
    projection, residual or norm). R is 1 with probability M in training and [M >= 0.5]
    in eval; its gradient passes straight through to M. No 1/keep rescaling: this is
    selection, not standard dropout."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.dropout_n_head or config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.shift = nn.Parameter(torch.full((config.n_embd,), float(config.shift_init)))
        # the write-up's "temperature" remark: sample masks at inference too (off by default)
        self.stochastic_inference = False

    def forward(self, x, kv_cache=None):
        z = attend(self.c_attn, x, self.n_head, kv_cache)  # (B, T, C)
        m = 0.5 * torch.cos(z + self.shift) + 0.5
        if self.training or self.stochastic_inference:
            # float32 noise: in a bf16 model, bf16 noise is so coarse that M = 0 keeps ~0.2% of channels
            noise = torch.rand(m.shape, device=m.device, dtype=torch.float32)
            hard = (noise <= m.float()).to(m.dtype)
            # forward value: hard + 0 exactly (m - m is 0 in every dtype); gradient: dR/dM = 1
            r = hard + (m - m.detach())
        else:
            r = (m >= 0.5).to(m.dtype)
        return x * r, m, r


class LearnedBlock(Block):
    """baseline_model.Block with its MLP output masked by a LearnedDropout of itself."""

    def __init__(self, config):
        super().__init__(config)
        self.learned_dropout = LearnedDropout(config)

    def forward(self, x, kv_cache=None):
        """Returns the new residual stream and this layer's (M, R)."""
        x = x + self.attn(self.ln_1(x), kv_cache)
        f = self.mlp(self.ln_2(x))
        f, m, r = self.learned_dropout(f, kv_cache)  # the mask is computed from f itself
        return x + f, m, r


# the per-layer statistics of METHOD.md section 4 (Logged statistics), in the order of GPT.mask_stats' rows
MASK_STATS = ('keep', 'penalty', 'mask_mean', 'mask_gt_0.9', 'mask_lt_0.1')


class GPT(BaselineGPT):
    """The GPT of baseline_model.py with a LearnedBlock in place of every Block."""

    block_type = LearnedBlock
    n_attn_per_block = 2  # the block's attention and the mask's attention

    def set_mask_mode(self, mode):
        """'deterministic' (default): R = [M >= 0.5] in eval; 'stochastic': R ~ Bernoulli(M)
        in eval too, the write-up's temperature-like inference."""
        if mode not in ('deterministic', 'stochastic'):
            raise ValueError(f"mask mode must be 'deterministic' or 'stochastic', got {mode!r}")
        for block in self.transformer.h:
            block.learned_dropout.stochastic_inference = mode == 'stochastic'

    @staticmethod
    def mask_stats(ms, rs, penalties):
        """(len(MASK_STATS), n_layer) tensor of per-layer statistics, from each layer's
        M, R and mean(M^2/2). Detached: no gradient, no host sync."""
        rows = []
        for m, r, p in zip(ms, rs, penalties):
            m, r = m.detach().float(), r.detach().float()
            rows.append(torch.stack([r.mean(), p.detach(), m.mean(),
                                     (m > 0.9).float().mean(), (m < 0.1).float().mean()]))
        return torch.stack(rows, dim=1)

    def hidden(self, idx, kv_cache=None):
        """(residual stream after the last block, each layer's M, each layer's R)."""
        x = self.embed(idx, kv_cache)
        ms, rs = [], []
        for block in self.transformer.h:
            x, m, r = block(x, kv_cache)
            ms.append(m)
            rs.append(r)
        return x, ms, rs

    def forward(self, idx, targets=None, kv_cache=None, return_stats=False):
        """logits, loss = model(idx, targets); in training the loss adds
        penalty_coeff * mean over layers of mean(M^2/2). With return_stats=True a third
        value is a dict of detached tensors: 'ce' (pure cross-entropy, with targets) and one
        (n_layer,) tensor per MASK_STATS name ('penalty' is mean(M^2/2), unweighted)."""
        x, ms, rs = self.hidden(idx, kv_cache)
        logits, loss = self.head(x, targets)
        ce = loss
        with_penalty = loss is not None and self.training and self.config.penalty_coeff > 0
        if with_penalty or return_stats:
            penalties = [(m.float() * m.float()).mean() / 2 for m in ms]  # mean(M^2/2) per layer
        if with_penalty:
            loss = loss + self.config.penalty_coeff * torch.stack(penalties).mean()
        if not return_stats:
            return logits, loss
        stats = dict(zip(MASK_STATS, self.mask_stats(ms, rs, penalties).unbind(0)))
        if ce is not None:
            stats['ce'] = ce.detach()
        return logits, loss, stats
