"""
The plain GPT baseline with standard (inverted) dropout, nanoGPT style.

This file also holds the building blocks that the LearnedDropout GPT in model.py
reuses: LayerNorm, the fused causal attention `attend` with its KV cache, the MLP,
and the GPT methods that do not depend on the block type (init, optimizer,
MFU, generation).
"""

import dataclasses
import inspect
import math
import typing
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    """The model's settings: each field is also a train.py option (config files, --name=value, --help
    shows the comment beside it), so a new setting is one new field here or in a subclass.
    __post_init__ checks every value, so a bad one fails before anything is built or written.
    The defaults are the seed runs' shapes (METHOD.md, "The seed experiments")."""
    block_size: int = 200  # context length
    vocab_size: int = 50257  # set by train.py from the data's meta.json
    n_layer: int = 26  # transformer blocks
    n_head: int = 9  # attention heads per block
    n_embd: int = 144  # width of the residual stream
    dropout: float = 0.0  # standard dropout rate (baseline and moe; must be 0 in the learned model)
    bias: bool = False  # biases in Linear and LayerNorm layers (GPT-2: True; the seed runs: False)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            check_field_type(self, f)
        for name in ('block_size', 'vocab_size', 'n_layer', 'n_head', 'n_embd'):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def check_field_type(config, field):
    """ValueError unless the field's value has its annotated type (an int stands for a float, and is
    converted); floats must be finite: 1e400 would pass every `x >= 0` rule and fail much later."""
    value = getattr(config, field.name)
    allowed = typing.get_args(field.type) or (field.type,)  # Optional[int] -> (int, NoneType)
    if float in allowed and type(value) is int:
        value = float(value)
        setattr(config, field.name, value)
    if type(value) not in allowed:
        names = ' or '.join('None' if t is type(None) else t.__name__ for t in allowed)
        raise ValueError(f"{field.name} must be {names}, got {value!r}")
    if type(value) is float and not math.isfinite(value):
        raise ValueError(f"{field.name} must be a finite number, got {value!r}")


# The training loss's output layer, chunked: with return_logits=False, GPT.forward computes the loss a chunk of
# tokens at a time, so that the (B*T, vocab) logits are never held whole (nor their float32 copy, softmax and
# gradient). A chunk holds at most CE_CHUNK_LOGITS logits: 2^26 (256 MiB in float32) is 1335 tokens of GPT-2's
# vocabulary, 8 chunks for a seed micro-batch of 50 x 200 tokens. Read when forward runs (a compiled model
# recompiles if it changes).
CE_CHUNK_LOGITS = 2 ** 26


def ce_chunk_tokens(vocab_size):
    """Tokens per chunk of chunked_cross_entropy: as many as keep a chunk's logits within CE_CHUNK_LOGITS."""
    return max(1, CE_CHUNK_LOGITS // vocab_size)


def chunked_cross_entropy(h, weight, targets, chunk_tokens=None):
    """F.cross_entropy(h @ weight.T, targets, ignore_index=-1) (the mean over targets != -1) for h (N, C),
    weight (V, C) and targets (N,), without ever holding the (N, V) logits: chunk_tokens rows at a time
    (default ce_chunk_tokens(V)). The product is in the autocast dtype where autocast is on (as
    nn.Linear's), the softmax in float32. Where a gradient is needed, ChunkedCrossEntropy computes it
    chunk by chunk in the forward pass; under no_grad, or with no input requiring one, no gradient is computed."""
    chunk = chunk_tokens or ce_chunk_tokens(weight.size(0))
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    need_h, need_w = torch.is_grad_enabled() and h.requires_grad, torch.is_grad_enabled() and weight.requires_grad
    if need_h or need_w:
        return ChunkedCrossEntropy.apply(h, weight, targets, chunk, dtype, need_h, need_w)
    loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
    w = weight.to(dtype)
    for start in range(0, h.size(0), chunk):
        t = targets[start:start + chunk]  # (c,)
        logp = F.log_softmax((h[start:start + chunk].to(dtype) @ w.t()).float(), dim=-1)  # (c, V)
        loss_sum = loss_sum + chunk_nll(logp, t)
    return loss_sum / (targets != -1).sum()


def chunk_nll(logp, t):
    """Summed -log p of the targets t (c,) != -1 under the log-probabilities logp (c, V)."""
    nll = -logp.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1)  # (c,)
    return torch.where(t != -1, nll, 0.0).sum()


class ChunkedCrossEntropy(torch.autograd.Function):
    """chunked_cross_entropy with a gradient. The forward pass walks over the chunks of tokens and, for each,
    computes its logits, its summed loss and, from its softmax p, the gradients of the mean loss as the full
    path's backward computes them: g = (p - onehot) / count in float32, cast to the logits' dtype, g @ W for
    the chunk's h and g.T @ h for W (those products in the logits' dtype, W's summed over chunks in float32).
    Only the gradients (N x C and V x C) are kept for backward, which scales them by grad_output; autograd
    would keep every chunk's logits instead. In float16, whose range is too small for the unscaled g of
    many tokens (GradScaler scales the loss for the full path), g is divided by count in backward instead."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk, dtype, need_h, need_w):
        w = weight.to(dtype)  # (V, C)
        valid = targets != -1  # (N,)
        count = valid.sum()
        inv = 1.0 / count.float() if dtype != torch.float16 else torch.ones((), device=h.device)  # g's scale
        loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_hs, grad_w = [], None
        for start in range(0, h.size(0), chunk):
            h_c, t = h[start:start + chunk].to(dtype), targets[start:start + chunk]  # (c, C), (c,)
            logp = F.log_softmax((h_c @ w.t()).float(), dim=-1)  # (c, V)
            loss_sum = loss_sum + chunk_nll(logp, t)
            # g = d(loss)/d(logits) = p * inv - onehot(t) * inv (F.cross_entropy's backward), for the rows whose
            # target is not ignored: the other rows of h get 0 and add nothing to W's
            g = logp.exp_().mul_(inv).scatter_add_(1, t.clamp(min=0).unsqueeze(1), (-inv).expand(t.size(0), 1))
            g = g.to(dtype)  # (c, V)
            v = valid[start:start + chunk].unsqueeze(1)  # (c, 1)
            if need_h:
                grad_hs.append(torch.where(v, g @ w, 0.0).float())  # (c, C)
            if need_w:
                gw = (g.t() @ torch.where(v, h_c, 0.0)).float()  # (V, C)
                grad_w = gw if grad_w is None else grad_w + gw
        post = 1.0 / count.float() if dtype == torch.float16 else torch.ones((), device=h.device)
        ctx.save_for_backward(torch.cat(grad_hs) if need_h else None, grad_w, post)
        ctx.h_dtype, ctx.w_dtype = h.dtype, weight.dtype
        return loss_sum / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, post = ctx.saved_tensors
        scale = grad_loss * post  # grad_output (and 1 / count in float16)
        grad_h = (grad_h * scale).to(ctx.h_dtype) if grad_h is not None else None
        grad_w = (grad_w * scale).to(ctx.w_dtype) if grad_w is not None else None
        return grad_h, grad_w, None, None, None, None, None


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's cannot switch the bias off on its own)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class KVCache(dict):
    """Keys and values of the tokens seen so far, one (k, v) pair of (B, nh, T, hs)
    tensors per attention, keyed by that attention's c_attn module. One object serves
    the whole model, so a block with two attentions (model.py) needs nothing extra."""

    @property
    def length(self):
        return next(iter(self.values()))[0].size(2) if self else 0


def dropout(x, p):
    """Inverted dropout in training: each element kept with probability 1 - p, independently, and scaled
    by 1 / (1 - p); reproducible from torch's seed (its random state is saved in checkpoints). On a GPU
    this is F.dropout; on a CPU, dropout_mask's cheaper random bits."""
    if x.device.type != 'cpu':
        return F.dropout(x, p)
    keep, scale = dropout_mask(x, p)
    return x * torch.where(keep, scale, 0.0).to(x.dtype)


def dropout_mask(x, p):
    """(keep, scale) for dropout on a CPU: a bool tensor shaped like x, True with probability 1 - p, and
    1 / that probability. Drawing one float per element dominates a small model's step on a CPU, so the
    bits are cheaper: 16 per element, which rounds p to a multiple of 2^-16 (0.2 is 0.199997; the scale
    uses the rounded value, so the expectation stays exact). Eager code takes 4 elements' bits from each
    64-bit draw of torch's generator; compiled code hashes each element's index with a 32-bit seed drawn
    from that generator per call (a counter-based generator that the compiler fuses into the consumer).
    The two draw different masks from the same seed."""
    n, drop = x.numel(), round(p * 65536)
    if torch.compiler.is_compiling():
        seed = torch.randint(0, 2 ** 32, (), dtype=torch.int64, device=x.device)
        index = torch.arange(n, dtype=torch.int64, device=x.device).view(x.shape)
        keep = (mix32(mix32(index) ^ seed) & 0xFFFF) >= drop
    else:
        bits = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
        keep = bits.view(torch.int16)[:n].view(x.shape) >= drop - 32768
    return keep, 65536 / (65536 - drop)


def mix32(h):
    """A 32-bit integer hash (xor-shift-multiply rounds, a bijection) of int64 tensors holding values below
    2^32; the multipliers are below 2^31, so no product overflows."""
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & 0xFFFFFFFF
    h = h ^ (h >> 15)
    h = (h * 0x31848BAB) & 0xFFFFFFFF
    return h ^ (h >> 16)


class Dropout(nn.Module):
    """nn.Dropout with the dropout() above: active in training only."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        return dropout(x, self.p) if self.training and self.p > 0 else x


def attend(c_attn, x, n_head, kv_cache=None, dropout_p=0.0):
    """Causal multi-head self-attention of x with itself, heads merged back to (B, T, C).

    c_attn is the fused q, k, v projection (C -> 3C). With a kv_cache, x holds only
    the new tokens: their keys and values are appended to the cached ones and the
    queries attend to everything up to their own position."""
    B, T, C = x.size()
    q, k, v = c_attn(x).split(C, dim=2)
    q = q.view(B, T, n_head, C // n_head).transpose(1, 2)  # (B, nh, T, hs)
    k = k.view(B, T, n_head, C // n_head).transpose(1, 2)  # (B, nh, T, hs)
    v = v.view(B, T, n_head, C // n_head).transpose(1, 2)  # (B, nh, T, hs)
    if kv_cache is not None:
        if c_attn in kv_cache:
            past_k, past_v = kv_cache[c_attn]
            k, v = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)
        kv_cache[c_attn] = (k, v)
    Tk = k.size(2)
    if x.device.type == 'cpu' and T > 1 and (dropout_p or q.dtype in (torch.bfloat16, torch.float16)):
        # on a CPU the fused kernel is slower than explicit attention in bf16 (BENCHMARK.md), though faster in
        # float32 and for one new token, and its dropout would draw a float per element
        if dropout_p and Tk == T and q.dtype == torch.float32 and not torch.compiler.is_compiling():
            y = DropoutAttention.apply(q, k, v, dropout_p)  # eager training: fewer passes, same masks
        else:
            y = blocked_attention(q, k, v, dropout_p)
    elif Tk == T:  # no past: the usual causal mask
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    elif T == 1:  # one new token sees every cached one
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    else:  # several new tokens after a past: causal mask aligned to the bottom right
        mask = torch.ones(T, Tk, dtype=torch.bool, device=x.device).tril(diagonal=Tk - T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    return y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)


ATTENTION_BLOCKS = 4  # query blocks of the explicit CPU attention with dropout


def query_blocks(T, Tk, blocks):
    """(start, end, mask) of each block of queries: queries [start, end) see keys [0, Tk - T + end), and
    mask is True where a key is visible (causal, aligned to the bottom right when Tk > T)."""
    Tq = -(-T // blocks)
    for start in range(0, T, Tq):
        end = min(start + Tq, T)
        yield start, end, torch.ones(end - start, Tk - T + end, dtype=torch.bool).tril(diagonal=Tk - T + start)


def blocked_attention(q, k, v, dropout_p):
    """Causal attention as three explicit ops, the scores (a bf16 product under autocast) scaled and
    normalized in float32. With dropout the queries go in ATTENTION_BLOCKS blocks, each against only the
    keys it can see, which skips most of the masked half of the (T, Tk) probabilities."""
    T, Tk = q.size(2), k.size(2)
    ys = []
    for start, end, mask in query_blocks(T, Tk, ATTENTION_BLOCKS if dropout_p else 1):
        n = mask.size(1)  # keys these queries can see
        att = (q[:, :, start:end] @ k[:, :, :n].transpose(-2, -1)).float() * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(~mask, float('-inf')).softmax(dim=-1)  # (B, nh, Tq, n)
        if dropout_p:
            att = dropout(att, dropout_p)
        ys.append(att.to(v.dtype) @ v[:, :, :n])  # (B, nh, Tq, hs)
    return torch.cat(ys, dim=2) if len(ys) > 1 else ys[0]  # (B, nh, T, hs)


class DropoutAttention(torch.autograd.Function):
    """blocked_attention(q, k, v, p) for float32 eager training without a past, with a hand-written
    backward: the same blocks, the same dropout_mask draws in the same order (so the same masks from a
    seed), but each pass over the (Tq, n) probabilities done once and in place where autograd would
    allocate and scale them again: the scale 1/sqrt(hs) goes into q and the dropout scale into the
    (T, hs) output. Saves per block the probabilities and the bool keep mask."""

    @staticmethod
    def forward(ctx, q, k, v, p):
        q = (q * (1.0 / math.sqrt(q.size(-1)))).contiguous()  # (B, nh, T, hs)
        k, v = k.contiguous(), v.contiguous()
        ys, saved, scale = [], [], 1.0
        for start, end, mask in query_blocks(q.size(2), k.size(2), ATTENTION_BLOCKS):
            n = mask.size(1)
            att = q[:, :, start:end] @ k[:, :, :n].transpose(-2, -1)  # (B, nh, Tq, n)
            att = att.masked_fill_(~mask, float('-inf')).softmax(dim=-1)
            keep, scale = dropout_mask(att, p)
            ys.append(torch.where(keep, att, 0.0) @ v[:, :, :n])  # (B, nh, Tq, hs), not yet scaled
            saved += [att, keep]
        ctx.save_for_backward(q, k, v, *saved)
        ctx.scale = scale
        return torch.cat(ys, dim=2).mul_(scale)  # (B, nh, T, hs)

    @staticmethod
    def backward(ctx, dy):
        q, k, v, *saved = ctx.saved_tensors
        dy = dy * ctx.scale  # (B, nh, T, hs): the dropout scale, applied once
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for (start, end, mask), att, keep in zip(query_blocks(q.size(2), k.size(2), ATTENTION_BLOCKS),
                                                 saved[0::2], saved[1::2]):
            n, dyb = mask.size(1), dy[:, :, start:end]
            dv[:, :, :n] += torch.where(keep, att, 0.0).transpose(-2, -1) @ dyb
            datt = (dyb @ v[:, :, :n].transpose(-2, -1)).masked_fill_(~keep, 0.0)  # (B, nh, Tq, n)
            dscore = torch._softmax_backward_data(datt, att, -1, att.dtype)  # zero where masked (att = 0)
            dq[:, :, start:end] = dscore @ k[:, :, :n]
            dk[:, :, :n] += dscore.transpose(-2, -1) @ q[:, :, start:end]
        return dq.mul_(1.0 / math.sqrt(q.size(-1))), dk, dv, None


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x, kv_cache=None):
        # dropout on the attention probabilities only in training: never in eval
        y = attend(self.c_attn, x, self.n_head, kv_cache, self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()  # exact (erf) GELU
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None):
        x = x + self.attn(self.ln_1(x), kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """nanoGPT's GPT: learned absolute positions, pre-LN blocks, tied embedding/head.

    Subclasses (model.GPT, moe_model.GPT) choose their block through `block_type` and may
    override `hidden` and `forward`; everything else here is shared. forward(..., return_stats=True)
    returns a dict of detached tensors that train.py logs as they come: a scalar as itself, a
    tensor whose first dimension is the layer as its mean over layers and, per layer, as NAME_per_layer."""

    block_type = Block
    n_attn_per_block = 1  # causal attentions per block, for the FLOP count
    console_stats = ()  # statistics (keys of forward's stats) that train.py prints in its progress lines

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=Dropout(config.dropout),
            h=nn.ModuleList([self.block_type(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: one matrix embeds tokens and scores them
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream
        for pn, p in self.named_parameters():
            if pn.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self):
        """Parameters, the tied embedding counted once and the position table not at all
        (the convention of the seed's reported sizes)."""
        return sum(p.numel() for p in self.parameters()) - self.transformer.wpe.weight.numel()

    def embed(self, idx, kv_cache=None):
        """Token + position embeddings of idx (B, T); positions continue after the cache."""
        start = kv_cache.length if kv_cache is not None else 0
        T = idx.size(1)
        if start + T > self.config.block_size:
            raise ValueError(f"cannot forward {start + T} positions: block_size is {self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        return self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))

    def head(self, x, targets, return_logits=True):
        """Final LayerNorm and LM head: (logits of every position, mean cross-entropy) with
        targets, else (logits of the last position, None) as nanoGPT's generation expects.
        With targets and return_logits=False: (None, the same cross-entropy), computed by
        chunked_cross_entropy without ever holding the (B, T, vocab) logits (train.py's way)."""
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None  # (B, 1, vocab)
        if not return_logits:
            return None, chunked_cross_entropy(x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1))
        logits = self.lm_head(x)  # (B, T, vocab)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def hidden(self, idx, kv_cache=None):
        """(residual stream after the last block,): model.GPT adds each layer's masks."""
        x = self.embed(idx, kv_cache)
        for block in self.transformer.h:
            x = block(x, kv_cache)
        return x,

    def forward(self, idx, targets=None, kv_cache=None, return_stats=False, return_logits=True):
        """logits, loss = model(idx, targets). With return_stats=True a third value, a dict
        of detached tensors for logging, comes back (here only 'ce'; see model.GPT). With targets
        and return_logits=False, logits is None and the loss is computed in chunks of tokens
        (chunked_cross_entropy): the same value and gradients, without the (B, T, vocab) logits."""
        x, = self.hidden(idx, kv_cache)
        logits, loss = self.head(x, targets, return_logits)
        if return_stats:
            return logits, loss, {'ce': loss.detach()} if loss is not None else {}
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on the >= 2-D parameters (matrices, embeddings) only;
        LayerNorm gains and LearnedDropout shifts are not decayed."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
            {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0},
        ]
        fused = device_type == 'cuda' and 'fused' in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({'fused': True} if fused else {}))

    def flops_per_token(self):
        """Training FLOPs (forward + backward) per token at full context: 6 per parameter
        for the matmuls, plus 12 * T * C per layer for each causal attention's scores
        and weighted values (PaLM appendix B, nanoGPT's estimate)."""
        cfg = self.config
        attn = 12 * cfg.n_layer * cfg.block_size * cfg.n_embd * self.n_attn_per_block
        return 6 * self.get_num_params() + attn

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops=312e12):
        """Model FLOPs utilisation of fwdbwd_per_iter sequences in dt seconds against
        peak_flops (default: A100 bf16, as nanoGPT)."""
        flops_per_iter = self.flops_per_token() * self.config.block_size * fwdbwd_per_iter
        return flops_per_iter / dt / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True):
        """Append max_new_tokens sampled tokens to idx (B, T); call in eval mode.

        With the KV cache each step feeds only the new token. Once the sequence is longer
        than block_size, the context is cropped to the last block_size tokens as in nanoGPT;
        every position then shifts, so those steps recompute the window. use_cache=False is
        nanoGPT's full recompute at every step, kept as the reference."""
        block_size = self.config.block_size
        kv_cache = KVCache()
        # the head as a (C, vocab) matrix: a one-row product in nn.Linear's (vocab, C) layout
        # repacks the whole matrix on every call on a CPU
        head_t = self.lm_head.weight.t().contiguous()
        for _ in range(max_new_tokens):
            if use_cache and idx.size(1) <= block_size:
                x, *_ = self.hidden(idx[:, kv_cache.length:], kv_cache)
            else:
                x, *_ = self.hidden(idx[:, -block_size:])
            logits = self.transformer.ln_f(x[:, -1, :]) @ head_t / max(temperature, 1e-8)  # (B, vocab)
            if top_k is None:
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            else:  # sample among the top_k candidates only: the same distribution, far cheaper
                v, candidates = torch.topk(logits, min(top_k, logits.size(-1)))
                idx_next = candidates.gather(-1, torch.multinomial(F.softmax(v, dim=-1), num_samples=1))
            idx = torch.cat((idx, idx_next), dim=1)
        return idx
