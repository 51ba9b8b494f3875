# Plain GPT baseline (no dropout) on the embedded Wikipedia sample, longer than the quickstart for more readable samples
# (several times the quickstart's time): 6 layers at the seed runs' width (156, 12 heads of 13).
# python prepare_wiki.py --source=sample && python train.py config/small_baseline.py
out_dir = 'out/small_baseline'
dataset = 'wiki_sample'
model_type = 'baseline'
n_layer = 6
n_embd = 156
n_head = 12
dropout = 0.0
block_size = 256
batch_size = 8
gradient_accumulation_steps = 1
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 100
max_iters = 1000
lr_decay_iters = 1000
eval_interval = 200
eval_iters = 20
log_interval = 50
