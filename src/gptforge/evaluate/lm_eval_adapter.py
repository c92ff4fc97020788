"""An lm-evaluation-harness model for gptforge runs: `--model gptforge --model_args run=RUN_DIR`.

lm-eval (0.4) finds models in its own registry and reads no entry points, so the name `gptforge` exists
once this module is imported. From the command line, run the harness through this module, which registers
the model and then hands its arguments to lm-eval's own command line:

    python -m gptforge.evaluate.lm_eval_adapter --model gptforge --model_args run=RUN_DIR --tasks hellaswag

From Python, `import gptforge.evaluate.lm_eval_adapter` before `lm_eval.simple_evaluate(model="gptforge", ...)`.

model_args: run (a run directory or checkpoint folder, required), device (default auto; lm-eval's cuda:0
default falls back to auto where no GPU is visible), batch_size (default
32), precision (auto, fp32, bf16, ...; default fp32). The three request kinds:

- loglikelihood: gptforge's own scorer (evaluate/tasks.py: loglikelihoods), with `<|endoftext|>` before the
  context as every training document had, so accuracies equal `gptforge eval --tasks` on the same items.
- loglikelihood_rolling: the whole text in windows of block_size tokens (lm-eval's rolling windows), the
  first predicted from `<|endoftext|>`.
- generate_until: greedy or sampled continuation of `<|endoftext|>` + context (evaluate/generate.py), cut at
  the first stop string, at most max_gen_toks tokens.
"""

from __future__ import annotations

import sys

try:
    import lm_eval.models  # noqa: F401  (lm-eval's own models first: a non-empty registry is not filled later)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("the lm-evaluation-harness adapter needs lm_eval: pip install 'gptforge[eval]'") from e

from gptforge.evaluate.tasks import loglikelihoods


@register_model("gptforge")
class GptforgeLM(TemplateLM):
    """A gptforge run as an lm-eval model."""

    def __init__(self, run: str, device: str = "auto", batch_size: int | str = 32, precision: str = "fp32",
                 **_ignored):
        super().__init__()
        import torch

        from gptforge.runs import load_run
        from gptforge.runtime import pick_device, resolve_precision

        if str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line passes --device cuda:0 unless told otherwise
            print(f"gptforge: device {device} is not available here; using auto", file=sys.stderr)
            device = "auto"
        self._device = pick_device(device)
        self.loaded = load_run(run, self._device, report=lambda m: print(m, file=sys.stderr))
        if self.loaded.tokenizer is None:
            raise ValueError(f"{run}: the run has no tokenizer.json; lm-eval scores text")
        self.tokenizer = self.loaded.tokenizer
        self.model = self.loaded.model
        self.block_size = self.loaded.config.model.block_size
        self.batch_size = 32 if batch_size in ("auto", None) else int(batch_size)
        self.autocast = resolve_precision(precision, self._device).autocast

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot_id

    @property
    def max_length(self) -> int:
        return self.block_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        eot = self.eot_token_id
        pairs = [(ctx if ctx[:1] == [eot] else [eot, *ctx], cont) for _, ctx, cont in requests]
        results = loglikelihoods(self.model, pairs, self.block_size, self._device, self.batch_size, self.autocast)
        for (key, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for request in requests:
            (text,) = request.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(text), self.eot_token_id, self.block_size, 1)]
            results = loglikelihoods(self.model, windows, self.block_size, self._device, self.batch_size,
                                     self.autocast)
            total = sum(ll for ll, _ in results)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        import torch

        from gptforge.evaluate.generate import generate

        out = []
        for request in requests:
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            ids = [self.eot_token_id, *self.tok_encode(context)]
            with torch.no_grad(), self.autocast():
                new = generate(self.model, ids, max_new, temperature=temperature, eot_id=self.eot_token_id,
                               seed=kwargs.pop("seed", None))
            text = self.tok_decode([t for t in new if t != self.eot_token_id])
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            self.cache_hook.add_partial("generate_until", request.args, text)
            out.append(text)
        return out


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the `gptforge` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
