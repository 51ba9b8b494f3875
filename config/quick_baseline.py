# Plain GPT baseline (no dropout) on the embedded Wikipedia sample, sized for the quickstart on a CPU (README,
# Quickstart, says how long it takes): python prepare_wiki.py --source=sample && python train.py config/quick_baseline.py
# The 50257-word output layer dominates the cost at this size, so the model is narrow and steps are short.
out_dir = 'out/quick_baseline'
dataset = 'wiki_sample'
model_type = 'baseline'
n_layer = 4
n_embd = 64
n_head = 4
dropout = 0.0
block_size = 128
batch_size = 8
gradient_accumulation_steps = 1
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 30
max_iters = 500
lr_decay_iters = 500
eval_interval = 100
eval_iters = 10
log_interval = 50
