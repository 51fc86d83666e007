"""The reference pass: stored with the run, an interrupted pass continues to the same
table, a table of other data is refused."""

import contextlib

import pytest
import torch

from ft.errors import ConfigError
from ft.gang import setup_gangs
from ft.models import create_model, resolve_model
from ft.preference.data import PairPlanner, read_pairs
from ft.preference.reference import compute_reference, reference_fingerprint
from ft.tokenizers import load_tokenizer
from tests.preference.conftest import write_copy_pairs


def test_interrupted_pass_continues_to_the_same_table(tmp_path, one_thread):
    tok = load_tokenizer("ft_tiny")
    pairs = read_pairs(write_copy_pairs(tmp_path / "p.jsonl", 24), tok, max_seq_len=16)
    source = resolve_model("ft_tiny")
    model = create_model(source.config, device=torch.device("cpu"), dtype=torch.float32, checkpoint=source.checkpoint)
    gangs = setup_gangs(device="cpu", env={})
    planner = PairPlanner(pairs, max_seq_len=16, max_num_tokens=32, packing=True, pad_id=0)
    fingerprint = reference_fingerprint(pairs, model="ft_tiny")

    def run(directory, stop=None):
        return compute_reference(model, pairs, directory=directory, fingerprint=fingerprint, gangs=gangs,
                                 autocast=contextlib.nullcontext(), planner=planner, chunk_size=8, save_every=2,
                                 stop=stop)

    whole = run(tmp_path / "whole")
    assert whole.shape == (24, 2) and (whole < 0).all()
    assert run(tmp_path / "part", stop=lambda: True) is None  # stopped after the first save
    continued = run(tmp_path / "part")
    assert torch.equal(continued, whole)
    # A complete table is read back, not recomputed.
    model.lm_head.weight.data.add_(1.0)
    assert torch.equal(run(tmp_path / "part"), whole)
    with pytest.raises(ConfigError, match="reference log-probs of other data"):
        compute_reference(model, pairs, directory=tmp_path / "part", fingerprint=fingerprint + "x", gangs=gangs,
                          autocast=contextlib.nullcontext(), planner=planner, chunk_size=8)
