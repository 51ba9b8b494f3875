# LearnedDropout GPT on the embedded Wikipedia sample, longer than the quickstart for more readable samples
# (several times the quickstart's time): 6 layers at the seed runs' width (144, 9 heads of 16).
# python prepare_wiki.py --source=sample && python train.py config/small_learned.py
out_dir = 'out/small_learned'
dataset = 'wiki_sample'
model_type = 'learned'
n_layer = 6
n_embd = 144
n_head = 9
dropout = 0.0
penalty_coeff = 0.1
shift_init = 0.0
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
