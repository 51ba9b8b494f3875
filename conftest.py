"""Shared fixtures: the embedded Wikipedia sample, prepared once per test session.

Threads are pinned: on a 2-core machine a test process and the train.py subprocesses it starts would
otherwise each spin one OpenMP thread per core and slow each other down many times over."""

import os

os.environ.setdefault('OMP_NUM_THREADS', '1')  # before torch is imported, inherited by subprocesses
os.environ['HF_DATASETS_OFFLINE'] = '1'  # never wait on the Hub in tests

import pytest  # noqa: E402
import torch  # noqa: E402

import prepare_wiki  # noqa: E402

torch.set_num_threads(int(os.environ['OMP_NUM_THREADS']))


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
    """A data_dir holding wiki_sample (train.bin, val.bin, meta.json)."""
    path = tmp_path_factory.mktemp('data')
    prepare_wiki.main(['--source=sample', f'--data_dir={path}'])
    return str(path)
