"""Helpers the tests import by name (`from support import ...`): a module of its own, since `conftest` names
several files and which one an import finds depends on the folders a run collects."""

from __future__ import annotations

from pathlib import Path


def random_weights_run(data: Path, path: Path, step: int = 0) -> Path:
    """A weights-only run of a small random GPT on a prepared corpus: enough to load, sample, evaluate,
    quantize and prune."""
    import torch

    from gptforge.config import load_config
    from gptforge.data.datadir import load_data_dir
    from gptforge.model.gpt import GPT
    from gptforge.train.checkpoint import save_weights

    vocab = load_data_dir(data).vocab_size
    cfg = load_config(None, [f"data.dir={data}", f"model.vocab_size={vocab}", "model.n_layer=2", "model.n_head=2",
                             "model.n_embd=64", "model.block_size=32", "train.batch_size=4", "eval.tokens=512"])
    torch.manual_seed(0)
    save_weights(path, GPT(cfg.model), cfg.to_dict(), step=step, tokenizer_file=data / "tokenizer.json")
    return path
