"""
The GPT with LearnedDropout: each block masks its MLP output with a binary mask that a
small causal attention computes from that very output (METHOD.md sections 1-4:
the module, its placement, the objective and the logged statistics).

    a = h + Attn(LN1(h))
    f = MLP(LN2(a))
    h = a + f * R,   R ~ round(M),   M = 0.5 * cos(attend(f) + shift) + 0.5

Everything that is not LearnedDropout comes from baseline_model.py. Three comparison
variants are config fields whose defaults give the method above, unchanged:

    mask_input='embedding'    M is computed from one shared attention over the embeddings,
                              known before any block runs, instead of from f itself
    mask_fourier_terms=K      M = 0.5 + 0.5 * sum_k w_k cos(k z + b_k), k = 1..K
    mask_rounding='soft'      R = M: the output is f * M, with no sampling or rounding
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from baseline_model import GPTConfig as BaselineConfig, GPT as BaselineGPT
from baseline_model import Block, CausalSelfAttention, KVCache, attend

__all__ = ['GPTConfig', 'LearnedDropout', 'LearnedBlock', 'GPT', 'KVCache', 'MASK_STATS']


@dataclass
class GPTConfig(BaselineConfig):
    shift_init: float = 0.0  # initial value of every channel of the shift b, in [0, pi]
    dropout_n_head: Optional[int] = None  # heads of the mask attention (None: n_head)
    penalty_coeff: float = 0.1  # weight of mean(M^2/2) in the training loss (0: no penalty term)
    mask_input: str = 'mlp_output'  # masks computed from 'mlp_output' (f itself) or a shared 'embedding' attention
    detach_mask_input: bool = False  # 'embedding' only: no gradient into the shared attention (the author's code)
    mask_fourier_terms: int = 1  # K terms of M = 0.5 + 0.5 * sum_k w_k cos(k z + b_k); 1: the method's cosine
    mask_rounding: str = 'stochastic'  # 'stochastic' (R ~ M in training, [M >= 0.5] in eval) or 'soft' (R = M)

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
        if self.mask_input not in ('mlp_output', 'embedding'):
            raise ValueError(f"mask_input must be 'mlp_output' or 'embedding', got {self.mask_input!r}")
        if self.detach_mask_input and self.mask_input != 'embedding':
            raise ValueError("detach_mask_input=True needs mask_input='embedding' (it detaches the shared mask input)")
        if self.mask_fourier_terms < 1:
            raise ValueError(f"mask_fourier_terms must be >= 1, got {self.mask_fourier_terms}")
        if self.mask_rounding not in ('stochastic', 'soft'):
            raise ValueError(f"mask_rounding must be 'stochastic' or 'soft', got {self.mask_rounding!r}")


class LearnedDropout(nn.Module):
    """Input-dependent binary mask: x -> (x * R, M, R).

    M = 0.5 * cos(z + shift) + 0.5 with z the causal self-attention of x (no output
    projection, residual or norm). R is 1 with probability M in training and [M >= 0.5]
    in eval; its gradient passes straight through to M. No 1/keep rescaling: this is
    selection, not standard dropout.

    Variants (GPTConfig): z attends over a given `source` instead of x (mask_input);
    M = 0.5 + 0.5 * sum_k w_k cos(k z + b_k) with K > 1 terms, w = softmax(fourier_logits)
    (mask_fourier_terms); R = M with no rounding (mask_rounding='soft')."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.dropout_n_head or config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        K = config.mask_fourier_terms
        # the phases b_1..b_K, flat (K*C,): 1-D, so that the optimizer does not decay them; (C,) for K = 1
        self.shift = nn.Parameter(torch.full((K * config.n_embd,), float(config.shift_init)))
        # the series' weights are softmax(fourier_logits), uniform at init; K = 1 needs none (w_1 = 1)
        self.fourier_logits = nn.Parameter(torch.zeros(K)) if K > 1 else None
        self.soft = config.mask_rounding == 'soft'
        # the write-up's "temperature" remark: sample masks at inference too (off by default)
        self.stochastic_inference = False

    def mask(self, z):
        """M in [0, 1] from the attention output z (B, T, C)."""
        if self.fourier_logits is None:
            return 0.5 * torch.cos(z + self.shift) + 0.5
        K = self.fourier_logits.numel()
        k = torch.arange(1, K + 1, device=z.device, dtype=z.dtype).view(K, 1)  # (K, 1) frequencies
        w = self.fourier_logits.softmax(0).view(K, 1)  # (K, 1): >= 0 and summing to 1, so M stays in [0, 1]
        waves = torch.cos(k * z.unsqueeze(-2) + self.shift.view(K, -1))  # (B, T, K, C)
        return 0.5 * (w * waves).sum(-2) + 0.5

    def forward(self, x, kv_cache=None, source=None):
        """x (B, T, C) -> (x * R, M, R); the mask is computed from source (B, T, C) if given,
        else from x itself (the method)."""
        z = attend(self.c_attn, x if source is None else source, self.n_head, kv_cache)  # (B, T, C)
        m = self.mask(z)
        if self.soft:  # the control without sampling or rounding, in training and in eval
            r = m
        elif self.training or self.stochastic_inference:
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

    def forward(self, x, kv_cache=None, mask_source=None):
        """Returns the new residual stream and this layer's (M, R). The mask is computed from
        f itself, or from mask_source (B, T, C) where the model shares one (mask_input='embedding')."""
        x = x + self.attn(self.ln_1(x), kv_cache)
        f = self.mlp(self.ln_2(x))
        f, m, r = self.learned_dropout(f, kv_cache, mask_source)
        return x + f, m, r


# the per-layer statistics of METHOD.md section 4 (Logged statistics), in the order of GPT.mask_stats' rows
MASK_STATS = ('keep', 'penalty', 'mask_mean', 'mask_gt_0.9', 'mask_lt_0.1')


class GPT(BaselineGPT):
    """The GPT of baseline_model.py with a LearnedBlock in place of every Block (and, with
    mask_input='embedding', one more attention, transformer.mask_attn, feeding every mask)."""

    block_type = LearnedBlock
    n_attn_per_block = 2  # the block's attention and the mask's attention

    def __init__(self, config):
        super().__init__(config)
        if config.mask_input == 'embedding':
            # one attention over the embeddings, shared by every layer's mask: masks known before any block runs.
            # Added after the base init, so every other weight is the default model's at the same seed; N(0, 0.02)
            # for its c_proj too, which writes into no residual stream.
            self.transformer.mask_attn = CausalSelfAttention(config)
            self.transformer.mask_attn.apply(self._init_weights)

    def flops_per_token(self):
        """The base count, plus the shared mask attention's scores and weighted values (its
        weights are among the parameters already)."""
        extra = 12 * self.config.block_size * self.config.n_embd if self.config.mask_input == 'embedding' else 0
        return super().flops_per_token() + extra

    def set_mask_mode(self, mode):
        """'deterministic' (default): R = [M >= 0.5] in eval; 'stochastic': R ~ Bernoulli(M)
        in eval too, the write-up's temperature-like inference. No effect on soft masks (R = M)."""
        if mode not in ('deterministic', 'stochastic'):
            raise ValueError(f"mask mode must be 'deterministic' or 'stochastic', got {mode!r}")
        for block in self.transformer.h:
            block.learned_dropout.stochastic_inference = mode == 'stochastic'

    @staticmethod
    def mask_stats(ms, rs, penalties):
        """(len(MASK_STATS), n_layer) tensor of per-layer statistics, from each layer's
        M, R and mean(M^2/2). Detached: no gradient, no host sync. 'keep' is the mean of R:
        the share of 1s, or mean(M) with mask_rounding='soft'."""
        rows = []
        for m, r, p in zip(ms, rs, penalties):
            m, r = m.detach().float(), r.detach().float()
            rows.append(torch.stack([r.mean(), p.detach(), m.mean(),
                                     (m > 0.9).float().mean(), (m < 0.1).float().mean()]))
        return torch.stack(rows, dim=1)

    def mask_source(self, x, kv_cache=None):
        """The input of every layer's mask with mask_input='embedding': the shared attention of
        the embeddings x (B, T, C), detached if detach_mask_input. None: each layer uses its f."""
        if self.config.mask_input != 'embedding':
            return None
        source = self.transformer.mask_attn(x, kv_cache)  # (B, T, C)
        return source.detach() if self.config.detach_mask_input else source

    def hidden(self, idx, kv_cache=None):
        """(residual stream after the last block, each layer's M, each layer's R)."""
        x = self.embed(idx, kv_cache)
        source = self.mask_source(x, kv_cache)
        ms, rs = [], []
        for block in self.transformer.h:
            x, m, r = block(x, kv_cache, source)
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
