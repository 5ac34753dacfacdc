"""The perplexity in ``quant_report.json``: exp of the mean next-token cross-entropy, as torch computes it."""

import math

import torch
import torch.nn.functional as F

from quantize.report import _perplexity


def test_report_perplexity_is_exp_of_next_token_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 9, 17, generator=g) * 2
    tokens = torch.randint(0, 17, (3, 9), generator=g)
    expected = math.exp(float(F.cross_entropy(logits[:, :-1].reshape(-1, 17), tokens[:, 1:].reshape(-1))))
    assert math.isclose(_perplexity(torch.log_softmax(logits, -1), tokens), expected, rel_tol=1e-5)
    # A model that puts all mass on the right next token has perplexity 1.
    sure = torch.full((1, 4, 5), -1e4).scatter(-1, torch.tensor([[[1], [2], [3], [0]]]), 0.0)
    assert math.isclose(_perplexity(torch.log_softmax(sure, -1), torch.tensor([[0, 1, 2, 3]])), 1.0, rel_tol=1e-6)
