"""`gptforge chat RUN`: talk to a chat-tuned run in the terminal, or answer one prompt for a script.

The conversation is kept as messages and as the token ids the chat template (data/chat.py) gives them, the
answers as they were decoded; each turn appends the user's message and `<|assistant|>` to those ids. The
decoding session keeps its KV cache between turns, so a new turn prefills only the tokens after what the
cache already holds (the conversation so far is a prefix of the next prompt). Answers stream as they are
decoded and stop at `<|end|>`. The output safety filter sees every answer: in mask mode a word is shown
once it is complete (the filter may need all of it), in block mode the answer is shown when it is finished.

Interactive commands: /reset (forget the conversation, keep the system message), /system TEXT (set it and
start over), /exit (or Ctrl-D). Ctrl-C while an answer streams stops that answer (what was said so far is
kept in the history); Ctrl-C at the prompt only reminds how to leave.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from typing import TextIO

from gptforge.data.chat import ChatTemplate
from gptforge.errors import GptforgeError
from gptforge.evaluate.safety import SafetyFilter, _mask

HELP = "commands: /reset, /system TEXT, /exit (Ctrl-C stops an answer, Ctrl-D leaves)"


class ChatSession:
    """A conversation with one model: history, system message, sampling settings and the decoding session."""

    def __init__(self, model, template: ChatTemplate, *, system: str | None = None, max_new_tokens: int = 256,
                 temperature: float = 0.7, top_k: int | None = 50, top_p: float | None = None, seed: int = 0,
                 safety: SafetyFilter | None = None):
        from gptforge.evaluate.engine import Engine

        self.model, self.template, self.safety = model, template, safety
        self.system = system
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.max_new_tokens, self.seed, self.turns = max_new_tokens, seed, 0
        self.stopped = False  # whether the last answer was cut short by Ctrl-C
        self.decoder = Engine(model, slots=1)  # keeps the KV cache of the conversation between turns
        self.reset(system)

    def reset(self, system: str | None = None, *, keep_system: bool = True) -> None:
        """Forget the conversation; the system message stays, or becomes `system` with keep_system=False."""
        if not keep_system:
            self.system = system or None
        self.history: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.ids: list[int] = self.template.render(self.history)[0]  # the conversation as the model reads it

    def answer(self, text: str, stopped: Callable[[], bool] = lambda: False) -> Iterator[str]:
        """Stream the answer to a user message as pieces of text (filtered); the answer joins the history
        when it is finished or stopped (Ctrl-C raises KeyboardInterrupt out of the decoding: caught here)."""
        from gptforge.evaluate.generate import stream

        template = self.template
        ids = [*self.ids, *template.turn("user", template.tokenizer.encode(text)), template.role_ids["assistant"]]
        budget = min(self.max_new_tokens, self.model.config.block_size - len(ids))
        if budget < 1:
            raise GptforgeError(f"the conversation fills the model's context of {self.model.config.block_size} "
                                "tokens; /reset to start over")
        self.history.append({"role": "user", "content": text})
        new: list[int] = []
        shown = ""
        self.stopped = False
        try:
            for token in stream(self.model, ids, budget, eot_id=self.template.end_id, seed=self.seed + self.turns,
                                session=self.decoder, **self.sampling):
                if token == self.template.end_id:
                    break
                new.append(token)
                piece = self._stable(self.template.tokenizer.decode(new), shown)
                shown += piece
                if piece:
                    yield piece
        except KeyboardInterrupt:  # Ctrl-C while decoding: this answer ends here, the session goes on
            self.stopped = True
        finally:
            self.turns += 1
            raw = template.tokenizer.decode(new)
            self.history.append({"role": "assistant", "content": raw})
            self.ids = [*ids, *new, template.end_id]  # a stopped answer is closed like a finished one
        final = self.safety.apply(raw)[0] if self.safety is not None else raw
        if final.startswith(shown):
            rest = final[len(shown):]
            if rest:
                yield rest

    def _stable(self, text: str, shown: str) -> str:
        """What may be shown of `text` beyond `shown` now: all of it without a filter; in mask mode, up to the
        last complete word, masked; in block mode nothing until the end."""
        if self.safety is None:
            return text[len(shown):] if text.startswith(shown) and not text.endswith("\ufffd") else ""
        if self.safety.mode != "mask":
            return ""
        cut = max(text.rfind(" "), text.rfind("\n"))
        if cut < 0:
            return ""
        head = text[:cut + 1]
        spans = self.safety.check(head).spans
        masked = _mask(head, spans) if spans else head
        return masked[len(shown):] if masked.startswith(shown) else ""


def val_conversations(data, limit: int | None = None) -> list[list[dict]]:
    """The first `limit` conversations of a chat data dir's val split, parsed back from its tokens."""
    from gptforge.data.loader import TokenStream

    template = ChatTemplate(data.tokenizer)
    stream = TokenStream(data.val)
    tokens = stream.read(0, stream.total).tolist()
    starts = [i for i, t in enumerate(tokens) if t == template.eot_id] + [len(tokens)]
    out = []
    for a, b in zip(starts, starts[1:]):
        out.append(template.parse(tokens[a:b]))
        if limit is not None and len(out) == limit:
            break
    return out


def answer(model, template: ChatTemplate, history: list[dict], max_new_tokens: int, **sampling) -> str:
    """One answer to a conversation so far (its last message the user's), decoded to `<|end|>`."""
    from gptforge.evaluate.generate import generate

    ids = template.prompt_ids(history)
    budget = min(max_new_tokens, model.config.block_size - len(ids))
    if budget < 1:
        return ""
    new = generate(model, ids, budget, eot_id=template.end_id, **sampling)
    return template.tokenizer.decode(new[:-1] if new and new[-1] == template.end_id else new)


def answer_samples(model, data, n: int, max_new_tokens: int) -> list[str]:
    """Greedy answers to the first user questions of the val split, as "question -> answer" texts, through
    the default output safety filter."""
    safety = SafetyFilter.from_file()
    template = ChatTemplate(data.tokenizer)
    was_training = model.training
    model.eval()
    texts = []
    for conversation in val_conversations(data, n):
        asked = conversation[:next(i for i, m in enumerate(conversation) if m["role"] == "user") + 1]
        reply = answer(model, template, asked, max_new_tokens, temperature=0.0)
        texts.append(safety.apply(f"{asked[-1]['content']}\n-> {reply}")[0])
    model.train(was_training)
    return texts


def load_chat(args: argparse.Namespace) -> tuple[ChatSession, str]:
    """The session `gptforge chat` args describe, and the run's checkpoint path (for the banner)."""
    from gptforge.evaluate.safety import safety_from_args
    from gptforge.runs import load_run
    from gptforge.runtime import pick_device

    if args.temperature < 0 or args.top_k < 0 or args.top_p is not None and not 0 < args.top_p <= 1:
        raise GptforgeError(f"sampling needs --temperature >= 0, --top-k >= 0 and --top-p in (0, 1]; got "
                            f"{args.temperature}, {args.top_k} and {args.top_p}")
    if args.max_new_tokens < 1:
        raise GptforgeError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    safety = safety_from_args(args)
    run = load_run(args.run_dir, pick_device(args.device), report=lambda m: print(m, file=sys.stderr))
    template = ChatTemplate.from_tokenizer(run.tokenizer)
    if template is None:
        raise GptforgeError(
            f"{run.checkpoint} has no chat template: its tokenizer has no chat tokens, so it was never fine-tuned "
            "on conversations. Make chat data with `gptforge prepare --format chat --out DATA --tokenizer "
            f"{args.run_dir}/tokenizer.json` and fine-tune: `gptforge train finetune.init_from={args.run_dir} "
            "data.dir=DATA`")
    session = ChatSession(run.model, template, system=args.system, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p, seed=args.seed,
                          safety=safety)
    return session, str(run.checkpoint)


def run_chat(args: argparse.Namespace) -> int:
    """`gptforge chat`: one answer with --prompt, else the interactive loop."""
    session, checkpoint = load_chat(args)
    if args.prompt is not None:
        for piece in session.answer(args.prompt):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    print(f"chatting with {checkpoint}; {HELP}", flush=True)
    interact(session, input, sys.stdout)
    return 0


def interact(session: ChatSession, read: Callable[[str], str], out: TextIO) -> None:
    """The interactive loop over `read` (input) until /exit or end of input."""
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            out.write("\n")
            return
        except KeyboardInterrupt:
            out.write("\n(type /exit to leave)\n")
            continue
        if not line:
            continue
        if line == "/exit":
            return
        if line == "/reset":
            session.reset()
            out.write("(conversation reset)\n")
            continue
        if line.startswith("/system"):
            session.reset(line[len("/system"):].strip(), keep_system=False)
            out.write(f"(system message {'set' if session.system else 'cleared'}; conversation reset)\n")
            continue
        if line.startswith("/"):
            out.write(f"unknown command {line.split()[0]}; {HELP}\n")
            continue
        out.write("model> ")
        out.flush()
        answer = session.answer(line)
        try:
            for piece in answer:
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:  # between two tokens, outside the decoding: the answer so far is kept
            answer.close()
            session.stopped = True
        except GptforgeError as exc:
            out.write(f"({exc})")
        if session.stopped:
            out.write(" [stopped]")
        out.write("\n")
        out.flush()
