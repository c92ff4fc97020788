"""lm-evaluation-harness drives a gptforge run offline (a local task YAML over a local JSONL file): its
log-likelihoods and accuracies equal gptforge's own scorer; rolling log-likelihood and generation agree
with the model's loss and greedy generation. fp32."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from support import random_weights_run

from gptforge.evaluate.generate import generate
from gptforge.evaluate.tasks import item_requests, loglikelihoods, read_jsonl_task, score_task
from gptforge.runs import load_run
from gptforge.train.checkpoint import save_weights

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def run(small_data, tmp_path_factory):
    path = random_weights_run(small_data, tmp_path_factory.mktemp("lm") / "run")
    loaded = load_run(path, report=lambda m: None)
    torch.manual_seed(0)
    with torch.no_grad():  # random residual projections: zero-initialised ones would ignore the context
        for p in loaded.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_weights(path, loaded.model, loaded.config.to_dict(), step=1, tokenizer_file=small_data / "tokenizer.json")
    return path


def _items(tmp_path):
    contexts = ["def load(path):\n    with open(", "import json\nimport", "for key, value in",
                "    return json.", "class Decoder(", "if not isinstance(obj, "]
    choices = [["path) as f:", "json", "x"], [" os", " email.message", " sys"], [" items.items():", " x", " ("],
               ["dumps(obj)", "loads(s)", "x"], ["object):", "json.JSONDecoder):", "):"], ["dict):", "str", "x"]]
    lines = [json.dumps({"context": c, "choices": ch, "label": i % len(ch)})
             for i, (c, ch) in enumerate(zip(contexts, choices))]
    path = tmp_path / "items.jsonl"
    path.write_text("\n".join(lines) + "\n")
    (tmp_path / "local_mc.yaml").write_text(textwrap.dedent(f"""\
        task: local_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {path}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{context}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{label}}}}"
        target_delimiter: ""
        metric_list:
          - metric: acc
          - metric: acc_norm
        """))
    return path


def test_lm_eval_accuracy_and_loglikelihoods_equal_gptforge(run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import gptforge.evaluate.lm_eval_adapter  # noqa: F401  (registers --model gptforge)
    from lm_eval.tasks import TaskManager

    path = _items(tmp_path)
    out = lm_eval.simple_evaluate(model="gptforge", model_args=f"run={run},device=cpu", tasks=["local_mc"],
                                  task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True)
    theirs = out["results"]["local_mc"]
    loaded = load_run(run, report=lambda m: None)
    task = read_jsonl_task(path)
    ours = score_task(loaded.model, loaded.tokenizer, task, loaded.config.model.block_size)
    assert theirs["acc,none"] == ours["acc"] and theirs["acc_norm,none"] == ours["acc_norm"]
    samples = sorted(out["samples"]["local_mc"], key=lambda s: s["doc_id"])
    for sample, item in zip(samples, task.items):
        ll = [r[0][0] for r in sample["resps"]]
        mine = loglikelihoods(loaded.model, item_requests(loaded.tokenizer.encode, loaded.tokenizer.eot_id, item),
                              loaded.config.model.block_size)
        assert ll == pytest.approx([m for m, _ in mine], abs=1e-5)


def test_rolling_loglikelihood_and_generation(run):
    from lm_eval.api.instance import Instance

    from gptforge.evaluate.lm_eval_adapter import GptforgeLM

    lm = GptforgeLM(run=str(run), device="cpu")
    text = "def encode(obj):\n    return json.dumps(obj, indent=2)\n" * 3
    (total,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    full = [lm.eot_token_id, *lm.tok_encode(text)]
    n, w = len(full) - 1, lm.block_size
    assert n > 2 * w  # three windows: each predicts up to w tokens from the w tokens before the last of them
    nll = 0.0
    with torch.no_grad():
        for a in range(0, n, w):
            b = min(a + w, n)
            start = max(0, b - w)
            losses = lm.model(torch.tensor([full[start:b]]), torch.tensor([full[start + 1:b + 1]]), reduction="none")
            nll += losses[0, -(b - a):].sum().item()
    assert total == pytest.approx(-nll, rel=1e-5)

    request = Instance("generate_until", {}, ("import json\n", {"until": ["\n\n"], "max_gen_toks": 12}), 0)
    (generated,) = lm.generate_until([request])
    with torch.no_grad():
        greedy = generate(lm.model, [lm.eot_token_id, *lm.tok_encode("import json\n")], 12, temperature=0.0,
                          eot_id=lm.eot_token_id)
    expected = lm.tok_decode([t for t in greedy if t != lm.eot_token_id]).split("\n\n")[0]
    assert generated == expected
