# LearnedDropout GPT whose mask is a 3-term cosine series, M = 0.5 + 0.5 * sum_k w_k cos(k z + b_k),
# k = 1..3, w = softmax of learned logits (uniform at init), per-channel phases b_k all starting at
# shift_init. Otherwise learned_shift0.
#   total parameters  15,342,990  (learned 15,335,424 + 2 more phase vectors and 3 logits per layer;
#                                   baseline 15,441,192)
#   FLOPs per token  110,029,140  (learned 109,983,744, baseline 102,381,552)
# The seed run's shared settings (context 200, micro-batch 50 x 16 accumulation, AdamW 9e-4,
# 26,000 steps, ...) are train.py's defaults; see METHOD.md section 6 (The seed experiments).
out_dir = 'out/learned_fourier'
dataset = 'wikipedia'  # python prepare_wiki.py --max_tokens=42600000 (about the seed's 42.6M tokens)
model_type = 'learned'
n_layer = 26
n_embd = 144
n_head = 9
dropout = 0.0
penalty_coeff = 0.1
shift_init = 0.0
mask_fourier_terms = 3
