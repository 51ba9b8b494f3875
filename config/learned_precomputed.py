# LearnedDropout GPT with pre-computed masks: every layer's mask attends over one shared causal
# attention of the token + position embeddings (with an output projection) instead of over the
# MLP output f it masks, so the masks are known before any block runs. Otherwise learned_shift0.
#   total parameters  15,418,368  (learned 15,335,424 + the shared attention's 4 x 144^2 = 82,944;
#                                   baseline 15,441,192)
#   FLOPs per token  110,827,008  (learned 109,983,744, baseline 102,381,552)
# The seed run's shared settings (context 200, micro-batch 50 x 16 accumulation, AdamW 9e-4,
# 26,000 steps, ...) are train.py's defaults; see METHOD.md section 6 (The seed experiments).
out_dir = 'out/learned_precomputed'
dataset = 'wikipedia'  # python prepare_wiki.py --max_tokens=42600000 (about the seed's 42.6M tokens)
model_type = 'learned'
n_layer = 26
n_embd = 144
n_head = 9
dropout = 0.0
penalty_coeff = 0.1
shift_init = 0.0
mask_input = 'embedding'
detach_mask_input = False  # True: the author's code, where the shared attention never trained
