"""prepare_wiki.py and the offline GPT-2 tokenizer (no network: HF_DATASETS_OFFLINE=1): the vendored
ranks and their hash, the cut vocabulary, all sources (sample, files, jsonl, parquet, a local HF dataset),
the split by document, atomic writes, SIGTERM, stale temporaries (the user's own .tmp files kept),
offline failure, a full disk and bad input."""

import errno
import gzip
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import prepare_wiki
import tokenizer
from tokenizer import EOT, get_gpt2

HERE = os.path.dirname(os.path.abspath(__file__))
PREPARE = os.path.join(HERE, 'prepare_wiki.py')
INTERRUPTED = "prepare_wiki.py: interrupted; nothing complete was overwritten, run again to finish"


def prepare(*argv):
    prepare_wiki.main(list(argv))


def read_split(folder, split):
    return np.memmap(os.path.join(folder, f'{split}.bin'), dtype=np.uint16, mode='r')


def decode_docs(ids):
    """The documents of a token stream in which each document ends with <|endoftext|>."""
    assert ids[-1] == EOT
    return get_gpt2().decode(ids.tolist()).split('<|endoftext|>')[:-1]


# ---------------------------------------------------------------------------- tokenizer

def test_known_gpt2_ids():
    enc = get_gpt2()
    assert enc.encode('Hello world') == [15496, 995]
    assert enc.encode('<|endoftext|>', allowed_special='all') == [50256]
    assert enc.n_vocab == 50257 and enc.eot_token == EOT
    assert enc.decode(enc.encode(" don't  stop\n\n1984 café")) == " don't  stop\n\n1984 café"


def test_ranks_hash_is_checked(tmp_path):
    with gzip.open(tokenizer.RANKS_PATH, 'rb') as f:
        raw = f.read()
    corrupt = tmp_path / 'gpt2.tiktoken.gz'
    with gzip.open(corrupt, 'wb') as f:
        f.write(raw.replace(b' 1000\n', b' 1001\n', 1))
    with pytest.raises(tokenizer.TokenizerError, match='corrupted'):
        tokenizer.load_ranks(str(corrupt))
    with pytest.raises(tokenizer.TokenizerError, match='cannot read'):
        tokenizer.load_ranks(str(tmp_path / 'missing.gz'))
    with open(tokenizer.RANKS_PATH, 'rb') as f:
        (tmp_path / 'truncated.gz').write_bytes(f.read()[:1000])
    with pytest.raises(tokenizer.TokenizerError, match='cannot read'):
        tokenizer.load_ranks(str(tmp_path / 'truncated.gz'))


def test_codec_for_gpt2_and_its_cut():
    encode, decode = tokenizer.get_codec(50257)
    assert encode('Hello world<|endoftext|>') == [15496, 995, 50256] and decode([15496, 995]) == 'Hello world'
    # GPT-2 cut to its first 2047 ranks + <|endoftext|> = 2047: a vocabulary of 2048 with GPT-2's own ids
    encode, decode = tokenizer.get_codec(2048, tokenizer_cut=2047)
    gpt2 = get_gpt2()
    text = " The Moon is Earth's only natural satellite, 384,400 km away; café 日本<|endoftext|>Next"
    ids = encode(text)
    assert decode(ids) == text and max(ids) < 2048 and ids.count(2047) == 1 and decode([2047]) == '<|endoftext|>'
    for word in ('The', ' the', ' of', ' and', ' in', ' is', ' was', '.', ',', ' a'):  # GPT-2 ids < 2047
        assert encode(word) == gpt2.encode(word), word
    assert len(encode(' Moon')) > 1 and gpt2.encode(' Moon') == [6869]  # merged after rank 2047: several tokens
    cut = tokenizer.get_gpt2_cut(300)
    assert cut.n_vocab == 301 and max(cut.encode(text, allowed_special='all')) == 300
    with pytest.raises(tokenizer.TokenizerError, match='not GPT-2'):
        tokenizer.get_codec(300)
    with pytest.raises(tokenizer.TokenizerError, match='2048 of GPT-2 cut to 2047 ranks'):
        tokenizer.get_codec(300, tokenizer_cut=2047)
    with pytest.raises(tokenizer.TokenizerError, match='256 <= n'):
        tokenizer.get_gpt2_cut(100)


# ---------------------------------------------------------------------------- the embedded sample

@pytest.fixture(scope='module')
def sample_dir(tmp_path_factory):
    data = tmp_path_factory.mktemp('data')
    prepare('--source=sample', f'--data_dir={data}')
    return str(data / 'wiki_sample')  # separate from conftest's: these tests rerun and force it


def test_sample_bins_match_metadata(sample_dir):
    folder = sample_dir
    meta = json.load(open(os.path.join(folder, 'meta.json')))
    assert meta['vocab_size'] == 50257 and meta['dtype'] == 'uint16' and meta['source'] == 'sample'
    for split in ('train', 'val'):
        assert os.path.getsize(os.path.join(folder, f'{split}.bin')) == 2 * meta[f'{split}_tokens']
    assert meta['train_docs'] + meta['val_docs'] == 10033
    assert 0.95e6 < meta['train_tokens'] + meta['val_tokens'] < 1.1e6
    assert 0.07 < meta['val_docs'] / 10033 < 0.13


def test_sample_decodes_to_corpus_documents_split_by_document(sample_dir):
    folder = sample_dir
    corpus = set(prepare_wiki.sample_documents())
    train = decode_docs(np.array(read_split(folder, 'train')))
    val = decode_docs(np.array(read_split(folder, 'val')))
    assert set(train) <= corpus and set(val) <= corpus
    assert not set(train) & set(val)
    assert len(train) + len(val) == 10033


def test_rerun_is_noop_and_force_redoes(sample_dir, capsys):
    folder = sample_dir
    data_dir = os.path.dirname(folder)
    before = os.stat(os.path.join(folder, 'train.bin')).st_mtime_ns
    val_before = np.array(read_split(folder, 'val'))
    prepare('--source=sample', f'--data_dir={data_dir}')
    assert 'already prepared' in capsys.readouterr().out
    assert os.stat(os.path.join(folder, 'train.bin')).st_mtime_ns == before
    # other arguments are not a no-op: a different seed gives a different split
    prepare('--source=sample', f'--data_dir={data_dir}', '--name=reseeded', '--seed=1')
    other = np.array(read_split(os.path.join(data_dir, 'reseeded'), 'val'))
    assert not np.array_equal(other, np.array(read_split(folder, 'val')))
    prepare('--source=sample', f'--data_dir={data_dir}', '--force')
    assert os.stat(os.path.join(folder, 'train.bin')).st_mtime_ns != before
    assert np.array_equal(read_split(folder, 'val'), val_before)  # the split is deterministic


# ---------------------------------------------------------------------------- local files, hf

DOCS = [f"Document number {i}. It talks about topic {i % 7} in some detail.\nSecond line {i}." for i in range(40)]


def check_output(folder, docs):
    got = decode_docs(np.array(read_split(folder, 'train'))) + decode_docs(np.array(read_split(folder, 'val')))
    assert sorted(got) == sorted(docs)


def test_txt_files(tmp_path):
    (tmp_path / 'a.txt').write_text('\n<|endoftext|>\n'.join(DOCS[:20]))
    (tmp_path / 'b.txt').write_text('\n<|endoftext|>\n'.join(DOCS[20:]))
    prepare('--source=files', '--files', str(tmp_path / '*.txt'), f'--data_dir={tmp_path}', '--name=t')
    check_output(tmp_path / 't', DOCS)


def test_repeated_files_read_once_and_a_literal_separator_is_text(tmp_path, capsys):
    """a.txt named twice (and again by a glob) is read once, so no document lands in both splits; an
    <|endoftext|> inside a line is text, not a document break."""
    (tmp_path / 'a.txt').write_text('\n<|endoftext|>\n'.join(DOCS))
    prepare('--source=files', '--files', str(tmp_path / 'a.txt'), str(tmp_path / 'a.txt'), str(tmp_path / '*.txt'),
            f'--data_dir={tmp_path}', '--name=t')
    assert 'given more than once' in capsys.readouterr().err
    check_output(tmp_path / 't', DOCS)
    docs = DOCS + ['one <|endoftext|> two', 'three<|endoftext|>']
    (tmp_path / 'b.txt').write_text('\n<|endoftext|>\n'.join(docs))
    prepare('--source=files', '--files', str(tmp_path / 'b.txt'), f'--data_dir={tmp_path}', '--name=b')
    got = []
    for split in ('train', 'val'):  # documents end at the <|endoftext|> token, whatever their text holds
        ids = np.array(read_split(tmp_path / 'b', split))
        ends = np.flatnonzero(ids == EOT)
        got += [get_gpt2().decode(d.tolist()) for d in np.split(ids, ends + 1)[:-1]]
    assert sorted(d.removesuffix('<|endoftext|>') for d in got) == sorted(docs)


def test_a_second_preparation_of_the_same_folder_is_refused(tmp_path):
    """Two processes writing one dataset could mix their files: the second is refused while the first holds
    the folder's lock (taken here by a RunLock held in this process's child)."""
    holder = subprocess.Popen([sys.executable, '-c', 'import sys, time; sys.path.insert(0, sys.argv[1]); from runtime '
                               'import RunLock; import os; os.makedirs(sys.argv[2], exist_ok=True); '
                               'lock = RunLock(sys.argv[2]); print("locked", flush=True); time.sleep(60)',
                               os.path.dirname(os.path.abspath(prepare_wiki.__file__)), str(tmp_path / 'x')],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        (tmp_path / 'a.txt').write_text('\n<|endoftext|>\n'.join(DOCS))
        with pytest.raises(SystemExit, match=r'is in use by another run \(pid \d+\); wait for it to finish'):
            prepare('--source=files', '--files', str(tmp_path / 'a.txt'), f'--data_dir={tmp_path}', '--name=x')
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / 'x' / 'train.bin').exists()


def test_jsonl_file(tmp_path):
    with open(tmp_path / 'd.jsonl', 'w') as f:
        for d in DOCS:
            f.write(json.dumps({'text': d, 'id': 1}) + '\n')
    prepare('--source=files', '--files', str(tmp_path / 'd.jsonl'), f'--data_dir={tmp_path}', '--name=j')
    check_output(tmp_path / 'j', DOCS)


def test_parquet_file(tmp_path):
    pa = pytest.importorskip('pyarrow')  # a listed requirement: present in CI
    import pyarrow.parquet as pq
    pq.write_table(pa.table({'body': DOCS}), tmp_path / 'd.parquet')
    prepare('--source=files', '--files', str(tmp_path / 'd.parquet'), '--text_field=body',
            f'--data_dir={tmp_path}', '--name=p')
    check_output(tmp_path / 'p', DOCS)


def test_hf_path_on_local_dataset(tmp_path):
    src = tmp_path / 'local_wiki'
    src.mkdir()
    with open(src / 'train.jsonl', 'w') as f:
        for i, d in enumerate(DOCS):
            f.write(json.dumps({'id': str(i), 'title': f't{i}', 'text': d}) + '\n')
    prepare('--source=hf', f'--hf_dataset={src}', f'--data_dir={tmp_path}', '--name=h', '--max_articles=30')
    meta = json.load(open(tmp_path / 'h' / 'meta.json'))
    assert meta['train_docs'] + meta['val_docs'] == 30
    check_output(tmp_path / 'h', DOCS[:30])


def run_cli(*argv, env=None):
    return subprocess.run([sys.executable, os.path.join(HERE, 'prepare_wiki.py'), *argv],
                          capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize('offline_env', [True, False])
def test_offline_hf_fails_fast_naming_sample(tmp_path, offline_env):
    env = {k: v for k, v in os.environ.items() if not k.startswith('HF_')}
    if offline_env:
        env['HF_DATASETS_OFFLINE'] = '1'
    else:
        env['HF_ENDPOINT'] = 'https://127.0.0.1:9'  # nothing listens there: as if offline
    t0 = time.time()
    r = run_cli(f'--data_dir={tmp_path}', env=env)
    assert r.returncode != 0
    assert time.time() - t0 < 30  # no retries against an unreachable Hub (those take minutes)
    last = r.stderr.strip().splitlines()
    assert len(last) == 1 and '--source=sample' in last[0] and 'Traceback' not in r.stderr
    assert not os.path.exists(tmp_path / 'wikipedia')


@pytest.mark.slow
@pytest.mark.parametrize('argv,message', [
    (['--source=web'], 'invalid choice'),
    (['--source=files'], 'needs --files'),
    (['--source=files', '--files', 'missing.txt'], 'cannot read missing.txt'),
    (['--source=files', '--files', 'x.csv'], 'unsupported file type'),
    (['--source=files', '--files', 'empty.txt'], 'empty input'),
    (['--source=files', '--files', 'bad.jsonl'], "with a 'text' field"),
    (['--source=files', '--files', 'bad.parquet'], 'cannot read bad.parquet'),
    (['--source=files', '--files', 'folder'], 'folder is a folder'),
    (['--source=files', '--files', 'latin1.txt'], 'latin1.txt: not UTF-8 text'),
    (['--source=files', '--files', 'nums.jsonl'], "nums.jsonl:1: the 'text' field must be a string, got number"),
    (['--source=files', '--files', 'empty.txt', '--seed=-1'], '--seed must be >= 0'),
])
def test_bad_input_one_line(tmp_path, argv, message):
    (tmp_path / 'x.csv').write_text('a,b\n')
    (tmp_path / 'folder').mkdir()
    (tmp_path / 'latin1.txt').write_bytes('café'.encode('latin-1'))
    (tmp_path / 'nums.jsonl').write_text('{"text": 5}\n')
    (tmp_path / 'empty.txt').write_text('  \n')
    (tmp_path / 'bad.jsonl').write_text('{"body": "x"}\n')
    (tmp_path / 'bad.parquet').write_text('not parquet')
    r = subprocess.run([sys.executable, os.path.join(HERE, 'prepare_wiki.py'), *argv, '--data_dir=out'],
                       capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert message in lines[-1] and 'Traceback' not in r.stderr
    assert not os.path.exists(tmp_path / 'out' / 'files' / 'train.bin')


def test_unwritable_output(tmp_path):
    (tmp_path / 'blocker').write_text('a file where a folder should be')
    r = run_cli('--source=sample', f'--data_dir={tmp_path / "blocker"}')
    assert r.returncode != 0 and 'cannot write to' in r.stderr and 'Traceback' not in r.stderr


def test_interrupted_run_leaves_previous_output_whole(tmp_path):
    docs = DOCS * 60  # 2400 docs: the bad line comes after the first chunk was written
    path = tmp_path / 'd.jsonl'
    path.write_text(''.join(json.dumps({'text': d}) + '\n' for d in docs))
    prepare('--source=files', '--files', str(path), f'--data_dir={tmp_path}', '--name=x')
    folder = tmp_path / 'x'
    before = {f: (folder / f).read_bytes() for f in ('train.bin', 'val.bin', 'meta.json')}
    with open(path, 'a') as f:
        f.write(''.join(json.dumps({'text': d}) + '\n' for d in docs) + '{"oops": 1}\n')
    with pytest.raises(SystemExit, match='expected a JSON object'):
        prepare('--source=files', '--files', str(path), f'--data_dir={tmp_path}', '--name=x', '--force')
    assert {f: (folder / f).read_bytes() for f in before} == before
    assert sorted(os.listdir(folder)) == ['.lock', 'meta.json', 'train.bin', 'val.bin']  # no .tmp left
    # a first run that fails leaves no train.bin at all
    with pytest.raises(SystemExit):
        prepare('--source=files', '--files', str(path), f'--data_dir={tmp_path}', '--name=y')
    assert not os.path.exists(tmp_path / 'y' / 'train.bin')


def prepared(folder):
    """Every file in folder, once meta.json and the bins are checked to agree."""
    meta = json.loads((folder / 'meta.json').read_text())
    for split in ('train', 'val'):
        assert (folder / f'{split}.bin').stat().st_size == 2 * meta[f'{split}_tokens']
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder)) if name != '.lock'}


@pytest.mark.slow
def test_sigterm_removes_temporaries_and_keeps_previous_output(tmp_path):
    (tmp_path / 'small.txt').write_text('\n<|endoftext|>\n'.join(DOCS))
    prepare('--source=files', '--files', str(tmp_path / 'small.txt'), f'--data_dir={tmp_path}', '--name=x')
    before = prepared(tmp_path / 'x')
    big = tmp_path / 'big.jsonl'  # 20 chunks, about a second of work: still writing when the signal comes
    big.write_text(''.join(json.dumps({'text': f'{d} ' * 6}) + '\n' for d in DOCS * 1024))
    proc = subprocess.Popen([sys.executable, PREPARE, '--source=files', '--files', str(big), '--num_proc=1',
                             f'--data_dir={tmp_path}', '--name=x'],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 30
        while not any(name.endswith('.tmp') for name in os.listdir(tmp_path / 'x')):  # writing has begun
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    assert proc.returncode == 1, err
    assert err.strip().splitlines()[-1] == INTERRUPTED and 'Traceback' not in err
    assert prepared(tmp_path / 'x') == before  # no .tmp left, nothing replaced


def test_signal_during_threaded_encoding_waits_for_the_batch(monkeypatch):
    """A KeyboardInterrupt raised inside tiktoken's thread pool can leave a concurrent.futures lock held
    and hang the interpreter's exit; the handler holds the signal until the batch returns."""
    finished = []

    class Enc:
        eot_token = EOT

        def encode_ordinary_batch(self, docs, num_threads):
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs here, while the "threads" encode: it must not raise
            finished.append(True)
            return [[1, 2] for _ in docs]

    for name in ('holding', 'pending'):  # a failure here leaves nothing set for later tests
        monkeypatch.setattr(prepare_wiki, name, False)
    old = signal.signal(signal.SIGINT, prepare_wiki.on_interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            prepare_wiki.encode_docs(Enc(), ['a', 'b'], 1)
        assert finished == [True]  # raised after the batch, not inside it
        assert not prepare_wiki.pending  # acted on once, nothing left over for the next batch
    finally:
        signal.signal(signal.SIGINT, old)


def test_stale_temporaries_are_removed_live_and_user_files_kept(tmp_path):
    folder = tmp_path / 'x'
    folder.mkdir()
    host = socket.gethostname()
    stale = [f'train.bin.{host}.99999999.tmp']  # a writer killed with SIGKILL (no such pid: above pid_max)
    live = [f'val.bin.{host}.{os.getppid()}.tmp',  # a concurrent writer's
            'train.bin.some-other-host.99999999.tmp',  # a writer on another machine sharing the folder
            'notes.tmp', 'draft.v2.tmp', 'val.bin.tmp']  # the user's own files: not this code's pattern
    for name in stale + live:
        (folder / name).write_bytes(b'partial')
    (tmp_path / 'a.txt').write_text('\n<|endoftext|>\n'.join(DOCS))
    handler = signal.getsignal(signal.SIGTERM)
    prepare('--source=files', '--files', str(tmp_path / 'a.txt'), f'--data_dir={tmp_path}', '--name=x')
    assert signal.getsignal(signal.SIGTERM) == handler  # main() gives in-process callers their handler back
    check_output(folder, DOCS)
    assert sorted(os.listdir(folder)) == sorted(['.lock', 'meta.json', 'train.bin', 'val.bin'] + live)
    assert all((folder / name).read_bytes() == b'partial' for name in live)


class FullDisk:
    """A file whose write() stores a little and then fails as on a full disk."""
    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[:3])
        raise OSError(errno.ENOSPC, 'No space left on device')

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize('full', ['train.bin', 'meta.json'])
def test_disk_full_one_line_previous_output_whole(tmp_path, monkeypatch, full):
    (tmp_path / 'a.txt').write_text('\n<|endoftext|>\n'.join(DOCS))
    argv = ['--source=files', '--files', str(tmp_path / 'a.txt'), f'--data_dir={tmp_path}', '--name=x']
    prepare(*argv)
    before = prepared(tmp_path / 'x')

    def full_open(path, mode='r', *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        return FullDisk(f) if 'w' in mode and os.path.basename(path).startswith(full) else f
    monkeypatch.setattr(prepare_wiki, 'open', full_open, raising=False)
    with pytest.raises(SystemExit) as e:
        prepare(*argv, '--force')
    assert e.value.code == (f"prepare_wiki.py: error: cannot write to {tmp_path / 'x' / full}: No space left on "
                            f"device; nothing complete was overwritten; free some space or choose another --data_dir")
    assert prepared(tmp_path / 'x') == before  # the partial temporary is gone


@pytest.mark.parametrize('line,got', [('{"text": 5}', 'number'), ('{"text": null}', 'null'),
                                      ('{"text": ["a", "b"]}', 'array'), ('{"text": {"en": "a"}}', 'object')])
def test_jsonl_text_must_be_a_string(tmp_path, line, got):
    path = tmp_path / 'd.jsonl'
    path.write_text(json.dumps({'text': 'fine'}) + '\n' + line + '\n')
    with pytest.raises(SystemExit, match=f"^prepare_wiki.py: error: {re.escape(str(path))}:2: "
                                         f"the 'text' field must be a string, got {got}$"):
        prepare('--source=files', '--files', str(path), f'--data_dir={tmp_path}')


def test_parquet_and_hf_text_must_be_a_string(tmp_path):
    pa = pytest.importorskip('pyarrow')
    import pyarrow.parquet as pq
    pq.write_table(pa.table({'text': ['fine', None]}), tmp_path / 'd.parquet')
    with pytest.raises(SystemExit, match=r"d\.parquet: row 1 \(counting from 0\): the 'text' field must be "
                                         r"a string, got null$"):
        prepare('--source=files', '--files', str(tmp_path / 'd.parquet'), f'--data_dir={tmp_path}')
    src = tmp_path / 'local'
    src.mkdir()
    (src / 'train.jsonl').write_text('{"text": 5}\n{"text": 6}\n')
    with pytest.raises(SystemExit, match=r"local: row 0 \(counting from 0\): the 'text' field must be a string, "
                                         r"got number$"):
        prepare('--source=hf', f'--hf_dataset={src}', f'--data_dir={tmp_path}')


def test_plain_progress_lines_without_a_terminal(tmp_path):
    r = run_cli('--source=sample', '--max_articles=4096', f'--data_dir={tmp_path}')  # stderr: a pipe
    assert r.returncode == 0, r.stderr
    assert '\r' not in r.stdout + r.stderr and '\x1b[' not in r.stdout + r.stderr
    assert re.search(r'^prepare: 2,048 docs, [\d,]+ tokens so far, \d+ s$', r.stderr, re.M), r.stderr


def test_corrupt_meta_is_redone(tmp_path):
    (tmp_path / 'a.txt').write_text('\n<|endoftext|>\n'.join(DOCS))
    argv = ['--source=files', '--files', str(tmp_path / 'a.txt'), f'--data_dir={tmp_path}', '--name=x']
    prepare(*argv)
    (tmp_path / 'x' / 'meta.json').write_text('[]')  # valid JSON, but not an object
    prepare(*argv)
    prepared(tmp_path / 'x')
