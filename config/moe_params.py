# Mixture-of-experts baseline with the baseline's total parameters: the dense MLP's 4C = 624 hidden
# units split over 8 experts of 78, each token routed to 5 of them, so that 5/8 = 0.625 of the expert
# units are active, about the learned model's seed keep fraction (0.6167).
#   total parameters  15,473,640  (baseline 15,441,192 + the routers' 26 x 156 x 8 = 32,448; learned 15,335,424)
#   active per token  13,575,432  (3 unchosen experts x 2 x 78 x 156 per layer left out)
#   FLOPs per token   91,186,992  (6 x active + attention; baseline 102,381,552, learned 109,983,744)
# moe_model.py runs every expert on every token (unchosen ones weighted 0), so the work done is the
# dense baseline MLP's; the FLOPs above count the routed work only.
# The seed run's shared settings (context 200, micro-batch 50 x 16 accumulation, AdamW 9e-4,
# 26,000 steps, ...) are train.py's defaults; see METHOD.md section 6 (The seed experiments).
out_dir = 'out/moe_params'
dataset = 'wikipedia'  # python prepare_wiki.py --max_tokens=42600000 (about the seed's 42.6M tokens)
model_type = 'moe'
n_layer = 26
n_embd = 156
n_head = 12
dropout = 0.0
n_expert = 8
expert_top_k = 5
expert_hidden = 0  # 4 * 156 // 8 = 78 hidden units per expert
moe_aux_coeff = 0.01
router_z_coeff = 0.0
