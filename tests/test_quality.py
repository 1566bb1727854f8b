"""KL divergence and the evaluation that keeps a reference's log-probabilities, on tiny tensors and a toy model."""

import math
from types import SimpleNamespace

import pytest
import torch

from helpers import quality


def test_kl_divergence_matches_the_definition_on_two_known_distributions():
    p = torch.tensor([[0.5, 0.25, 0.25]])
    q = torch.tensor([[0.25, 0.5, 0.25]])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(0.25 / 0.5)
    assert quality.kl_divergence(p.log(), q.log()).item() == pytest.approx(expected, abs=1e-7)
    assert quality.kl_divergence(p.log(), p.log()).item() == 0.0


def test_kl_divergence_agrees_with_torch_kl_div():
    generator = torch.Generator().manual_seed(0)
    ref = torch.log_softmax(torch.randn(3, 5, 11, generator=generator), -1)
    cand = torch.log_softmax(torch.randn(3, 5, 11, generator=generator), -1)
    ours = quality.kl_divergence(ref, cand)
    theirs = torch.nn.functional.kl_div(cand, ref, log_target=True, reduction="none").sum(-1)
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert (ours > 0).all()


def test_kl_divergence_rejects_different_shapes():
    with pytest.raises(ValueError, match="same windows"):
        quality.kl_divergence(torch.zeros(2, 4), torch.zeros(2, 5))


class _TableModel(torch.nn.Module):
    """A bigram 'model': the logits of the next token are a row of a table, so the KL is known exactly."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)

    def get_input_embeddings(self):  # where models.model_device looks for the model's device
        return torch.nn.Embedding.from_pretrained(self.table)

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.table[input_ids])


def test_evaluate_reports_the_kl_of_a_candidate_against_the_kept_reference():
    generator = torch.Generator().manual_seed(1)
    vocab = 7
    reference_table, candidate_table = torch.randn(vocab, vocab, generator=generator), torch.randn(vocab, vocab, generator=generator)
    windows = torch.randint(0, vocab, (5, 9), generator=generator)
    reference = quality.evaluate(_TableModel(reference_table), windows, batch_size=2, keep_log_probs=True)
    assert reference.log_probs.shape == (5, 8, vocab) and reference.kl_divergence is None
    candidate = quality.evaluate(_TableModel(candidate_table), windows, batch_size=2, reference=reference)
    inputs = windows[:, :-1]
    expected = quality.kl_divergence(torch.log_softmax(reference_table[inputs], -1),
                                     torch.log_softmax(candidate_table[inputs], -1)).mean().item()
    assert candidate.kl_divergence == pytest.approx(expected, rel=1e-6)
    assert quality.compare_with_reference(reference, candidate)["kl_divergence"] == candidate.kl_divergence
    itself = quality.evaluate(_TableModel(reference_table), windows, batch_size=2, reference=reference)
    assert itself.kl_divergence == 0.0


def test_evaluate_keeps_only_the_windows_that_fit_the_budget():
    windows = torch.zeros(10, 257, dtype=torch.long)
    assert quality.kl_windows_to_keep(windows, vocab_size=4096) == 10
    assert quality.kl_windows_to_keep(windows, vocab_size=128_256) == 1  # 131 MB a window: only one fits 256 MB
    assert quality.kl_windows_to_keep(windows, vocab_size=128_256, max_bytes=1) == 1


def test_evaluate_with_a_reference_that_kept_nothing_says_what_to_do():
    windows = torch.zeros(1, 3, dtype=torch.long)
    plain = quality.evaluate(_TableModel(torch.zeros(2, 2)), windows)
    with pytest.raises(ValueError, match="keep_log_probs=True"):
        quality.evaluate(_TableModel(torch.zeros(2, 2)), windows, reference=plain)
