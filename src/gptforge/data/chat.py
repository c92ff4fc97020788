"""The chat template: conversations as token ids, with a loss mask, and back.

A conversation is rendered as

    <|endoftext|> <|system|> ... <|end|> <|user|> ... <|end|> <|assistant|> ... <|end|> ...

each message's role token, its content's tokens and `<|end|>`, with nothing between (the system message is
optional). The leading end-of-text token is where every document of pre-training began, so a conversation
reads as a new document to a base model. The four chat tokens are special tokens added to the run's
tokenizer after its vocabulary (`with_chat_tokens`), so text never produces them: a literal "<|user|>" in
a message is encoded as ordinary text, as "<|endoftext|>" is.

The loss mask marks the tokens a model is trained to predict: with train_on="assistant" (the default) the
content of each assistant message and the `<|end|>` that closes it, so the model learns what to answer and
when to stop; with train_on="all" every token after the leading end-of-text. An answer is generated from
`prompt_ids(messages)`, the history followed by `<|assistant|>`, and ends at `<|end|>` (`end_id`).
"""

from __future__ import annotations

from tokenizers import AddedToken

from gptforge.data.tokenizer import EOT, Tokenizer
from gptforge.errors import DataError

ROLES = ("system", "user", "assistant")
END = "<|end|>"
CHAT_TOKENS = tuple(f"<|{role}|>" for role in ROLES) + (END,)
TRAIN_ON = ("assistant", "all")

# The same rendering for Hugging Face tokenizers (tokenizer_config.json's chat_template).
JINJA_TEMPLATE = (
    "{{ '" + EOT + "' }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '" + END + "' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def with_chat_tokens(tok: Tokenizer) -> Tokenizer:
    """`tok` with the chat tokens added as special tokens after its vocabulary (a new Tokenizer; ids of every
    existing token unchanged). A tokenizer that has them already is returned as it is."""
    if ChatTemplate.from_tokenizer(tok) is not None:
        return tok
    import tokenizers

    inner = tokenizers.Tokenizer.from_str(tok.to_json())
    present = [t for t in CHAT_TOKENS if inner.token_to_id(t) is not None]
    if present:
        raise DataError(f"the tokenizer has {', '.join(present)} as ordinary tokens; chat tokens must be special")
    inner.add_special_tokens([AddedToken(t, special=True) for t in CHAT_TOKENS])
    return Tokenizer(inner)


class ChatTemplate:
    """Renders conversations (lists of {"role", "content"} dicts) for one tokenizer that has the chat tokens."""

    def __init__(self, tok: Tokenizer):
        ids = {t: tok._tok.token_to_id(t) for t in CHAT_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise DataError(f"the tokenizer has no chat tokens ({', '.join(missing)}); it has no chat template")
        self.tokenizer = tok
        self.role_ids = {role: ids[f"<|{role}|>"] for role in ROLES}
        self.end_id = ids[END]
        self.eot_id = tok.eot_id
        self._roles_by_id = {i: role for role, i in self.role_ids.items()}

    @classmethod
    def from_tokenizer(cls, tok: Tokenizer | None) -> ChatTemplate | None:
        """The template of `tok`, or None when it has no chat tokens (a run that was never fine-tuned to chat)."""
        if tok is None or any(tok._tok.token_to_id(t) is None for t in CHAT_TOKENS):
            return None
        return cls(tok)

    def render(self, messages: list[dict], train_on: str = "assistant") -> tuple[list[int], list[int]]:
        """(ids, mask) of a whole conversation; mask[i] is 1 where token i is a training target."""
        if train_on not in TRAIN_ON:
            raise ValueError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
        contents = self.tokenizer.encode_batch([m["content"] for m in messages])
        ids, mask = [self.eot_id], [0]
        for message, content in zip(messages, contents):
            learn = int(train_on == "all" or message["role"] == "assistant")
            ids += self.turn(message["role"], content)
            mask += [int(train_on == "all"), *([learn] * len(content)), learn]
        return ids, mask

    def turn(self, role: str, content: list[int]) -> list[int]:
        """One message's ids: its role token, its content's ids, `<|end|>`."""
        return [self.role_ids[role], *content, self.end_id]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The history rendered, then `<|assistant|>`: what an answer is generated from."""
        ids, _ = self.render(messages) if messages else ([self.eot_id], [0])
        return [*ids, self.role_ids["assistant"]]

    def parse(self, ids: list[int]) -> list[dict]:
        """Messages back from rendered ids (a trailing unfinished message included, as generated so far)."""
        messages: list[dict] = []
        role, content = None, []
        for i in ids:
            if i in self._roles_by_id:
                role, content = self._roles_by_id[i], []
            elif i == self.end_id and role is not None:
                messages.append({"role": role, "content": self.tokenizer.decode(content)})
                role = None
            elif role is not None:
                content.append(i)
        if role is not None:
            messages.append({"role": role, "content": self.tokenizer.decode(content)})
        return messages
