# Mixture-of-experts baseline with the baseline's FLOPs per token: 4 experts, each the full dense
# MLP (624 hidden units), each token routed to 1 of them (Switch Transformer style).
#   total parameters  30,643,080  (baseline 15,441,192 + 3 more MLPs and a 156 x 4 router per layer)
#   active per token  15,457,416  (baseline + the routers' 26 x 156 x 4 = 16,224; learned 15,335,424)
#   FLOPs per token  102,478,896  (6 x active + attention; baseline 102,381,552, learned 109,983,744)
# moe_model.py runs every expert on every token (unchosen ones weighted 0): the MLPs do 4x the routed
# work, which is why this uses 4 experts rather than 8; the FLOPs above count the routed work only.
# The seed run's shared settings (context 200, micro-batch 50 x 16 accumulation, AdamW 9e-4,
# 26,000 steps, ...) are train.py's defaults; see METHOD.md section 6 (The seed experiments).
out_dir = 'out/moe_flops'
dataset = 'wikipedia'  # python prepare_wiki.py --max_tokens=42600000 (about the seed's 42.6M tokens)
model_type = 'moe'
n_layer = 26
n_embd = 156
n_head = 12
dropout = 0.0
n_expert = 4
expert_top_k = 1
expert_hidden = 624  # 4 * n_embd: every expert is a full-width MLP
moe_aux_coeff = 0.01
router_z_coeff = 0.0
