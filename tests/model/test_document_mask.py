"""Document masking (model.doc_token): documents packed into one window compute what each computes alone."""

from __future__ import annotations

import pytest
import torch

from gptforge.model.config import GPTConfig
from gptforge.model.gpt import GPT, KVCache, document_mask

EOT = 0


def _model(pos: str, doc_token: int = EOT) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32, pos=pos, doc_token=doc_token,
                       zero_init_proj=False)
    return GPT(config).eval()


DOCS = [torch.tensor([EOT, 5, 6, 7, 8]), torch.tensor([EOT, 9, 10, 11]), torch.tensor([EOT, 3, 4])]


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_packed_documents_give_the_logits_of_each_document_alone(pos):
    model = _model(pos)
    with torch.no_grad():
        packed = model(torch.cat(DOCS)[None])[0]  # (T, V)
        alone = torch.cat([model(doc[None])[0] for doc in DOCS])
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)
    without = _model(pos, doc_token=-1)
    with torch.no_grad():
        crossed = without(torch.cat(DOCS)[None])[0]
    assert (crossed[5:] - alone[5:]).abs().max() > 1e-3  # without the mask the later documents see the first


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_cached_decoding_keeps_the_documents_apart(pos):
    model = _model(pos)
    x = torch.cat(DOCS)[None]
    with torch.no_grad():
        full = model(x)[0]
        cache = KVCache(1, model.config)
        steps = [model(x[:, :7], cache=cache)[0]]  # a prefill that ends inside the second document
        steps += [model(x[:, i:i + 1], cache=cache)[0] for i in range(7, x.size(1))]
    torch.testing.assert_close(torch.cat(steps), full, rtol=0, atol=1e-5)


def test_the_mask_and_positions():
    idx = torch.tensor([[4, EOT, 5, 6, EOT, 7], [EOT, 1, 2, 3, 4, 5]])
    mask, positions = document_mask(idx, EOT, None)
    assert positions.tolist() == [[0, 0, 1, 2, 0, 1], [0, 1, 2, 3, 4, 5]]
    seen = mask[:, 0]  # (B, T, T)
    assert seen[0, 3].tolist() == [False, True, True, True, False, False]  # token 6 sees its document so far
    assert seen[1].equal(torch.ones(6, 6, dtype=torch.bool).tril())  # one document: plain causal
    single, _ = document_mask(torch.tensor([[EOT, 1, 2]]), EOT, None)
    assert single is None  # every row one document: the fast causal path


def test_a_masked_model_trains_through_the_mask():
    model = _model("rope").train()
    x = torch.cat(DOCS)[None]
    loss = model(x, torch.roll(x, -1, dims=1))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_the_flex_attention_path_computes_what_the_sdpa_mask_does():
    """The path gptforge takes on a GPU (compiled there), run eagerly here: same logits as the SDPA mask."""
    import warnings

    model = _model("rope")
    x = torch.stack([torch.cat(DOCS), torch.arange(1, 13)])  # (2, 12): three documents, and one
    with torch.no_grad():
        sdpa = model(x)
        model.flex_documents = True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eager flex attention warns that it is not compiled
            flex = model(x)
    torch.testing.assert_close(flex, sdpa, rtol=0, atol=1e-5)
