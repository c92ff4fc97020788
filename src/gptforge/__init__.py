"""gptforge: train, adapt, compress, check and serve GPT models as fast as the hardware allows."""

from __future__ import annotations

__version__ = "0.1.0"


def load(path, device: str = "cpu"):
    """Model (in eval mode) and tokenizer of a run directory (newest intact checkpoint) or a checkpoint folder.

        model, tokenizer = gptforge.load("runs/gpt")
        logits = model(torch.tensor([tokenizer.encode("def f(x):")]))  # (1, T, vocab_size)
    """
    from gptforge.runs import load_run

    run = load_run(path, device)
    return run.model, run.tokenizer


__all__ = ["__version__", "load"]
