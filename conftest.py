"""Shared fixtures: the embedded Wikipedia sample, prepared once per test session."""

import os

import pytest

import prepare_wiki

os.environ['HF_DATASETS_OFFLINE'] = '1'  # never wait on the Hub in tests


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
    """A data_dir holding wiki_sample (train.bin, val.bin, meta.json)."""
    path = tmp_path_factory.mktemp('data')
    prepare_wiki.main(['--source=sample', f'--data_dir={path}'])
    return str(path)
