"""
The GPT with LearnedDropout: each block masks its MLP output with a binary mask that a
small causal attention computes from that very output (METHOD.md sections 1-4:
the module, its placement, the objective and the logged statistics).

    a = h + Attn(LN1(h))
    f = MLP(LN2(a))
    h = a + f * R,   R ~ round(M),   M = 0.5 * cos(z + shift) + 0.5,   z = attend(f)

Everything that is not LearnedDropout comes from baseline_model.py. LearnedDropout computes
z, then M = mask(z), then R = round(M): a variant overrides one of those two methods in a small
subclass. The comparison variants are chosen by config fields whose defaults give the method:

    mask_fourier_terms=K      FourierMask: M = 0.5 + 0.5 * sum_k w_k cos(k z + b_k), k = 1..K
    mask_rounding='soft'      SoftMask: R = M, the output is f * M, no sampling or rounding
    mask_input='embedding'    M is computed from one shared attention over the embeddings,
                              known before any block runs, instead of from f itself
    mask_class='mod.Class'    your own LearnedDropout subclass (README, "Your own mask"), or one of
                              the controls here: StaticMask (one learned M per channel, no input)
                              and RandomMask (a fixed M, not learned)
"""

import importlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from baseline_model import GPTConfig as BaselineConfig, GPT as BaselineGPT
from baseline_model import Block, CausalSelfAttention, KVCache, attend

__all__ = ['GPTConfig', 'LearnedDropout', 'FourierMask', 'SoftMask', 'SoftFourierMask', 'StaticMask', 'RandomMask',
           'LearnedBlock', 'GPT', 'KVCache', 'MASK_STATS']


@dataclass
class GPTConfig(BaselineConfig):
    shift_init: float = 0.0  # learned: initial shift b of the mask's cosine, in [0, pi]
    dropout_n_head: Optional[int] = None  # learned: heads of the mask attention (None: n_head)
    penalty_coeff: float = 0.1  # learned: weight of mean(M^2/2) in the loss (0: no penalty)
    mask_input: str = 'mlp_output'  # learned: the mask attends over 'mlp_output' (the method) or 'embedding' (pre-computed)
    detach_mask_input: bool = False  # learned, mask_input='embedding': detach the shared mask input (the author's code did)
    mask_fourier_terms: int = 1  # learned: terms K of the cosine series mapping z to M (1: the method's single cosine)
    mask_rounding: str = 'stochastic'  # learned: 'stochastic' (the method) or 'soft' (output f * M, no rounding: a control)
    mask_class: str = ''  # learned: your own LearnedDropout subclass as 'module.Class' ('': the method or the variants above)

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.shift_init <= math.pi:
            raise ValueError(f"shift_init must be in [0, pi] (the write-up's B), got {self.shift_init}")
        if self.dropout_n_head is not None and self.dropout_n_head < 1:
            raise ValueError(f"dropout_n_head must be >= 1 or None (= n_head), got {self.dropout_n_head}")
        n = self.dropout_n_head or self.n_head
        if self.n_embd % n:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by dropout_n_head ({n})")
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
        cls = self.mask_type()  # an unknown mask_class fails here, before anything is built
        if self.mask_fourier_terms != 1 and not issubclass(cls, FourierMask):
            raise ValueError(f"mask_fourier_terms={self.mask_fourier_terms} needs a FourierMask; {cls.__name__} is not one")
        if self.mask_rounding == 'soft' and not issubclass(cls, SoftMask):
            raise ValueError(f"mask_rounding='soft' needs a SoftMask; {cls.__name__} is not one")

    def mask_type(self):
        """The LearnedDropout class every block uses."""
        if self.mask_class:
            return import_mask_class(self.mask_class)
        fourier, soft = self.mask_fourier_terms > 1, self.mask_rounding == 'soft'
        return {(False, False): LearnedDropout, (True, False): FourierMask,
                (False, True): SoftMask, (True, True): SoftFourierMask}[fourier, soft]


def import_mask_class(name):
    """The class named 'module.Class', checked to be a LearnedDropout subclass. The module is found
    where Python finds modules: next to the script that runs (train.py, sample.py) or on PYTHONPATH."""
    module_name, _, class_name = name.rpartition('.')
    if not module_name:
        raise ValueError(f"mask_class must be 'module.Class' (e.g. 'my_mask.SigmoidMask'), got {name!r}")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:  # the user's module was found, something it imports was not
            raise ValueError(f"mask_class {name!r}: importing {module_name} failed: {e}") from None
        raise ValueError(f"mask_class {name!r}: cannot import {module_name} ({e}); put {module_name}.py next to "
                         f"train.py or on PYTHONPATH") from None
    except ImportError as e:
        raise ValueError(f"mask_class {name!r}: importing {module_name} failed: {e}") from None
    except AttributeError:
        raise ValueError(f"mask_class {name!r}: {module_name} has no {class_name}") from None
    if not (isinstance(cls, type) and issubclass(cls, LearnedDropout)):
        raise ValueError(f"mask_class {name!r} must be a subclass of model.LearnedDropout")
    return cls


class LearnedDropout(nn.Module):
    """Input-dependent binary mask: x -> (x * R, M, R), the method (METHOD.md section 1).

    z is the causal self-attention of x (no output projection, residual or norm), M = mask(z)
    in [0, 1], R = round(M). No 1/keep rescaling: this is selection, not standard dropout.
    A variant overrides mask (the mapping z -> M) or round (M -> R) in a subclass; its extra
    parameters go in __init__ after super().__init__ (1-D ones get no weight decay)."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.dropout_n_head or config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.shift = nn.Parameter(torch.full((config.n_embd,), float(config.shift_init)))  # b, (C,)
        # the write-up's "temperature" remark: sample masks at inference too (off by default)
        self.stochastic_inference = False

    def attention(self, x, kv_cache=None):
        """z (B, T, C): the causal self-attention of x, with no output projection, residual or norm."""
        return attend(self.c_attn, x, self.n_head, kv_cache)

    def mask(self, z):
        """M in [0, 1] from the attention output z (B, T, C)."""
        return 0.5 * torch.cos(z + self.shift) + 0.5

    def round(self, m):
        """R from M: 1 with probability M in training (and with stochastic_inference), [M >= 0.5]
        in eval. The forward value is exactly 0 or 1; the gradient passes straight through to M."""
        if not (self.training or self.stochastic_inference):
            return (m >= 0.5).to(m.dtype)
        # float32 noise: bf16 noise is so coarse (0 once in 256 draws) that M = 0 would keep channels
        noise = torch.rand(m.shape, device=m.device, dtype=torch.float32)
        hard = (noise <= m.float()).to(m.dtype)
        return hard + (m - m.detach())  # forward: hard + 0 exactly (m - m is 0 in every dtype); dR/dM = 1

    def forward(self, x, kv_cache=None, source=None):
        """x (B, T, C) -> (x * R, M, R); the mask attends over source (B, T, C) if given, else
        over x itself (the method)."""
        z = self.attention(x if source is None else source, kv_cache)  # (B, T, C)
        m = self.mask(z)  # (B, T, C), in [0, 1]
        r = self.round(m)  # (B, T, C), 0 or 1
        return x * r, m, r


class FourierMask(LearnedDropout):
    """M = 0.5 + 0.5 * sum_k w_k cos(k z + b_k), k = 1..K, with w = softmax(fourier_logits), uniform
    at init: w >= 0 and sums to 1, so M stays in [0, 1]. K = 1 is the method's cosine."""

    def __init__(self, config):
        super().__init__(config)
        K = config.mask_fourier_terms
        # the phases b_1..b_K, flat (K*C,): 1-D, so that the optimizer does not decay them
        self.shift = nn.Parameter(torch.full((K * config.n_embd,), float(config.shift_init)))
        self.fourier_logits = nn.Parameter(torch.zeros(K))

    def mask(self, z):
        K = self.fourier_logits.numel()
        k = torch.arange(1, K + 1, device=z.device, dtype=z.dtype).view(K, 1)  # (K, 1) frequencies
        w = self.fourier_logits.softmax(0).view(K, 1)  # (K, 1)
        waves = torch.cos(k * z.unsqueeze(-2) + self.shift.view(K, -1))  # (B, T, K, C)
        return 0.5 * (w * waves).sum(-2) + 0.5


class SoftMask(LearnedDropout):
    """The control without sampling or rounding: R = M, in training and in eval."""

    def round(self, m):
        return m


class SoftFourierMask(SoftMask, FourierMask):
    """FourierMask's M with SoftMask's R = M."""


class StaticMask(LearnedDropout):
    """A control: z = 0, so M = 0.5 * cos(b) + 0.5 is one learned keep probability per channel, the same for
    every token; sampled, rounded and penalised as the method. Does the mask need the input at all?
    (At shift_init 0 or pi it cannot move: dM/db = -0.5 sin(b) is 0 there and no z varies it.)"""

    def __init__(self, config):
        super().__init__(config)
        del self.c_attn  # no attention: nothing of the input reaches the mask

    def attention(self, x, kv_cache=None):
        return torch.zeros_like(x)


class RandomMask(StaticMask):
    """A control: random masks at the method's site, each channel kept with the fixed probability
    M = 0.5 * cos(shift_init) + 0.5 (so shift_init = acos(2 q - 1) keeps a share q), not learned, no
    rescaling (selection, as the method). Is learning the mask needed?"""

    def __init__(self, config):
        super().__init__(config)
        shift = self.shift.detach()
        del self.shift
        self.register_buffer('shift', shift)  # fixed: not a parameter


class LearnedBlock(Block):
    """baseline_model.Block with its MLP output masked by a LearnedDropout of itself."""

    def __init__(self, config):
        super().__init__(config)
        self.learned_dropout = config.mask_type()(config)

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
    console_stats = ('ce', 'penalty', 'keep')

    @property
    def n_attn_per_block(self):
        """The block's attention and the mask's, for the FLOP count (the controls without one: 1)."""
        return 1 + hasattr(self.transformer.h[0].learned_dropout, 'c_attn')

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
        the share of 1s, or mean(M) with soft masks."""
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

    def forward(self, idx, targets=None, kv_cache=None, return_stats=False, return_logits=True):
        """logits, loss = model(idx, targets); in training the loss adds
        penalty_coeff * mean over layers of mean(M^2/2). With return_stats=True a third
        value is a dict of detached tensors: 'ce' (pure cross-entropy, with targets) and one
        (n_layer,) tensor per MASK_STATS name ('penalty' is mean(M^2/2), unweighted).
        return_logits=False: logits None, the cross-entropy in chunks (baseline_model.GPT.forward)."""
        x, ms, rs = self.hidden(idx, kv_cache)
        logits, loss = self.head(x, targets, return_logits)
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
