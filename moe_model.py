"""
A mixture-of-experts GPT: the baseline of baseline_model.py with every MLP replaced by a
token-choice mixture of experts, a comparison for the LearnedDropout GPT (model.py), whose
masks also switch off part of each MLP output depending on the input.

    a = h + Attn(LN1(h))
    p = softmax(router(LN2(a)))               router: C -> n_expert, no bias, float32
    h = a + sum over the top-k experts e of p: g_e * MLP_e(LN2(a)),   g = p renormalised over the k

Each expert has the baseline MLP's shape (C -> expert_hidden -> C, exact GELU). Routing is
per token (a token's experts depend on that token only) and dropless (no capacity limit).
Training adds the Switch Transformer load-balancing loss, and optionally the router z-loss.

Compute: every expert runs on every token and the unchosen ones are scaled by 0: two plain
matmuls, no host sync, fixed shapes (torch.compile fullgraph). At small sizes this beats gathering
each expert's tokens (argsort, per-expert matmuls, index_add, one host sync per layer for the split
sizes), but it does n_expert / top_k times the routed work: flops_per_token counts the routed
(active) work only. BENCHMARK.md has the measured step times.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from baseline_model import GPTConfig as BaselineConfig, GPT as BaselineGPT
from baseline_model import Block, Dropout, KVCache

__all__ = ['GPTConfig', 'ExpertLinear', 'MoEMLP', 'MoEBlock', 'GPT', 'KVCache', 'MOE_STATS']


@dataclass
class GPTConfig(BaselineConfig):
    n_expert: int = 8  # moe: experts per MLP
    expert_top_k: int = 2  # moe: experts chosen per token
    expert_hidden: int = 0  # moe: hidden units per expert (0: 4 * n_embd // n_expert, the dense MLP split)
    moe_aux_coeff: float = 0.01  # moe: weight of the load-balancing loss in training (mean over layers)
    router_z_coeff: float = 0.0  # moe: weight of the router z-loss in training (0: off)

    def __post_init__(self):
        super().__post_init__()
        if self.n_expert < 1:
            raise ValueError(f"n_expert must be >= 1, got {self.n_expert}")
        if not 1 <= self.expert_top_k <= self.n_expert:
            raise ValueError(f"expert_top_k must be in [1, n_expert={self.n_expert}], got {self.expert_top_k}")
        if self.expert_hidden < 0:
            raise ValueError(f"expert_hidden must be >= 0 (0: 4 * n_embd // n_expert), got {self.expert_hidden}")
        if self.hidden_per_expert < 1:
            raise ValueError(f"4 * n_embd // n_expert is 0 ({self.n_expert} experts, n_embd {self.n_embd}): "
                             f"set expert_hidden")
        if self.moe_aux_coeff < 0:
            raise ValueError(f"moe_aux_coeff must be >= 0, got {self.moe_aux_coeff}")
        if self.router_z_coeff < 0:
            raise ValueError(f"router_z_coeff must be >= 0, got {self.router_z_coeff}")
        if self.bias:
            raise ValueError("bias=True is not supported by the MoE model (its experts have no biases)")

    @property
    def hidden_per_expert(self):
        return self.expert_hidden or 4 * self.n_embd // self.n_expert


class ExpertLinear(nn.Module):
    """n_expert bias-free linear maps stacked into one weight (n_expert, H, C). Row j of
    expert e holds hidden unit j's weights: its inputs in c_fc, its outputs in c_proj."""

    def __init__(self, n_expert, n_hidden, n_embd):
        super().__init__()
        # N(0, 0.02) as the GPT's nn.Linear init; the GPT then scales every c_proj by name
        self.weight = nn.Parameter(torch.randn(n_expert, n_hidden, n_embd) * 0.02)


class MoEMLP(nn.Module):
    """x -> (sum over the chosen experts of gate * MLP_e(x), load-balancing loss, z-loss, load).

    Expert e computes gelu(x @ c_fc[e].T) @ c_proj[e], the baseline MLP with weights
    c_fc.weight = c_fc[e] and c_proj.weight = c_proj[e].T."""

    def __init__(self, config):
        super().__init__()
        self.n_expert, self.top_k = config.n_expert, config.expert_top_k
        self.router = nn.Linear(config.n_embd, config.n_expert, bias=False)
        self.c_fc = ExpertLinear(config.n_expert, config.hidden_per_expert, config.n_embd)
        self.gelu = nn.GELU()  # exact (erf) GELU
        self.c_proj = ExpertLinear(config.n_expert, config.hidden_per_expert, config.n_embd)
        self.dropout = Dropout(config.dropout)

    def forward(self, x):
        B, T, C = x.size()
        E, H = self.c_fc.weight.shape[:2]
        x = x.reshape(B * T, C)  # (N, C): routing is per token
        with torch.autocast(x.device.type, enabled=False):  # float32 logits: bf16 ones flip near-tied choices
            logits = F.linear(x.float(), self.router.weight.float())  # (N, E)
        probs = logits.softmax(-1)  # (N, E)
        gate, expert = probs.topk(self.top_k, dim=-1)  # (N, k)
        gate = gate / gate.sum(-1, keepdim=True)  # renormalised over the chosen k
        weights = torch.zeros_like(probs).scatter(1, expert, gate)  # (N, E), 0 for the unchosen experts
        h = self.gelu(F.linear(x, self.c_fc.weight.view(E * H, C)))  # (N, E*H): every expert's hidden units
        h = h.view(-1, E, H) * weights.unsqueeze(-1).to(h.dtype)  # (N, E, H)
        y = h.view(-1, E * H) @ self.c_proj.weight.view(E * H, C)  # (N, C)
        # Switch Transformer load balance: n_expert * sum_i f_i P_i, f_i the share of the N*k slots routed to i
        load = torch.zeros_like(probs).scatter(1, expert, 1.0).mean(0) / self.top_k  # (E,), sums to 1
        aux = self.n_expert * (load * probs.mean(0)).sum()
        z_loss = logits.logsumexp(-1).square().mean()
        return self.dropout(y.view(B, T, C)), aux, z_loss, load


class MoEBlock(Block):
    """baseline_model.Block with a MoEMLP in place of its MLP."""

    def __init__(self, config):
        super().__init__(config)
        self.mlp = MoEMLP(config)

    def forward(self, x, kv_cache=None):
        """Returns the new residual stream and this layer's (aux loss, z-loss, load (n_expert,))."""
        x = x + self.attn(self.ln_1(x), kv_cache)
        y, aux, z_loss, load = self.mlp(self.ln_2(x))
        return x + y, aux, z_loss, load


# the per-layer statistics: the load-balancing loss (unweighted), the entropy in nats of the load
# shares (log n_expert when balanced) and the load shares themselves, (n_layer, n_expert)
MOE_STATS = ('moe_aux', 'load_entropy', 'expert_load')


class GPT(BaselineGPT):
    """The GPT of baseline_model.py with a MoEBlock in place of every Block."""

    block_type = MoEBlock
    n_attn_per_block = 1  # the block's attention, as the baseline
    console_stats = ('ce', 'load_entropy')

    def get_num_active_params(self):
        """Parameters that touch each token: all but the n_expert - top_k unchosen experts of every layer."""
        cfg = self.config
        per_expert = 2 * cfg.hidden_per_expert * cfg.n_embd  # its c_fc and c_proj rows
        return self.get_num_params() - cfg.n_layer * (cfg.n_expert - cfg.expert_top_k) * per_expert

    def flops_per_token(self):
        """The base count with only the active parameters: 6 per active parameter, plus the attention."""
        return super().flops_per_token() - 6 * (self.get_num_params() - self.get_num_active_params())

    def hidden(self, idx, kv_cache=None):
        """(residual stream after the last block, then (n_layer,) aux losses, (n_layer,) z-losses
        and (n_layer, n_expert) load shares)."""
        x = self.embed(idx, kv_cache)
        auxs, zs, loads = [], [], []
        for block in self.transformer.h:
            x, aux, z_loss, load = block(x, kv_cache)
            auxs.append(aux)
            zs.append(z_loss)
            loads.append(load)
        return x, torch.stack(auxs), torch.stack(zs), torch.stack(loads)

    def forward(self, idx, targets=None, kv_cache=None, return_stats=False, return_logits=True):
        """logits, loss = model(idx, targets); in training the loss adds moe_aux_coeff * the mean
        over layers of the load-balancing loss, and router_z_coeff * the mean z-loss. With
        return_stats=True a third value is a dict of detached tensors: 'ce' (with targets) and
        the MOE_STATS. return_logits=False: logits None, the cross-entropy in chunks
        (baseline_model.GPT.forward)."""
        x, aux, z_loss, load = self.hidden(idx, kv_cache)
        logits, loss = self.head(x, targets, return_logits)
        ce = loss
        if loss is not None and self.training:
            if self.config.moe_aux_coeff > 0:
                loss = loss + self.config.moe_aux_coeff * aux.mean()
            if self.config.router_z_coeff > 0:
                loss = loss + self.config.router_z_coeff * z_loss.mean()
        if not return_stats:
            return logits, loss
        load = load.detach()
        entropy = -torch.special.xlogy(load, load).sum(-1)  # (n_layer,), 0 log 0 = 0
        stats = dict(zip(MOE_STATS, (aux.detach(), entropy, load)))
        if ce is not None:
            stats['ce'] = ce.detach()
        return logits, loss, stats
