"""Closing a JSON answer before the budget runs out, on vLLM as the built-in engine does.

The built-in engine's grammar (`evaluation.constrained.JsonLogitsProcessor`) steers a row to
close once its remaining budget only just covers the rest of the answer (the reserve of the
field it is in): inside a string only tokens that end it, elsewhere `}`/`]`, then `"`, then
`,`, always within the grammar. vLLM's grammar has no such budget rule, so an answer that is
still writing a string when `max_tokens` is reached comes back cut and invalid.

So the vLLM paths follow the stream and, once the reserve is reached (`Closer.due`), check
each token vLLM picks against the built-in engine's closing set (`Closer.keeps`: the
gateway's llguidance matcher, the grammar the built-in engine uses, narrowed to the closing tier
as the built-in does). Where the tiers do not narrow (a string the schema does not let end
yet) or vLLM's pick is in the set, it is the built-in's pick too and the stream goes on. At the
first token that differs the stream is left (vLLM aborts the request) and the answer is
finished one token at a time: vLLM picks the greedy token among the allowed ones
(`allowed_token_ids`, applied after its raw logprobs, so the logprob stays the raw model's).
Only answers that would run out of budget, and then only their last few tokens, take this path.
"""

from __future__ import annotations

from typing import Any


class Closer:
    """One answer's budget watch and closing steps (`constraint`: a JsonConstraint)."""

    def __init__(self, constraint: Any, budget: int, tokenizer: Any):
        self.constraint, self.budget, self.tokenizer = constraint, budget, tokenizer
        self.n_vocab = len(tokenizer)
        self.reserve = constraint.reserve()
        self.names = [n for n in self.reserve if n is not None]
        self.matcher = constraint.matcher(self.n_vocab)
        self.fed = 0
        self.eos = _eos(tokenizer)

    def due(self, tokens: list[int], text: str) -> bool:
        """Whether the built-in engine would be closing before choosing the next token."""
        from ..evaluation.constrained import field_of

        return self.budget - len(tokens) <= self.reserve[field_of(text, self.names)]

    def _mask(self, tokens: list[int]) -> Any:
        """The grammar's allowed next tokens after `tokens` (a bool tensor)."""
        import torch

        for token in tokens[self.fed :]:
            self.matcher.consume_token(token)
        self.fed = len(tokens)
        words = (self.n_vocab + 31) // 32
        bitmask = torch.full((words,), -1, dtype=torch.int32)
        self.matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), words * 4)
        bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
        return bits.reshape(-1)[: self.n_vocab].to(torch.bool)

    def keeps(self, tokens: list[int], text: str, token: int) -> bool:
        """Whether vLLM's next `token` is the one the built-in engine would pick here. Its
        greedy pick within the grammar is also the greedy pick within any narrower set that
        holds it; where the closing tiers do not narrow (a string the schema does not let end
        yet), the sets are the same."""
        from ..evaluation.constrained import closing_set

        if token in self.eos or not self.due(tokens, text):
            return True
        mask = self._mask(tokens)
        narrowed = closing_set(mask, text.lstrip(), self.constraint, self.n_vocab)
        return token >= self.n_vocab or bool(narrowed[token])

    def allowed(self, tokens: list[int], text: str) -> list[int]:
        """The token ids the built-in engine allows next while closing."""
        from ..evaluation.constrained import closing_set

        mask = self._mask(tokens)
        narrowed = closing_set(mask, text.lstrip(), self.constraint, self.n_vocab)
        return narrowed.nonzero().flatten().tolist()


async def close_answer(
    client: Any,
    model: str,
    prompt_ids: list[int],
    tokens: list[int],
    logprobs: list[float],
    closer: Closer,
) -> list[int]:
    """Append closing tokens (and their raw logprobs) to `tokens` / `logprobs` until the
    answer is complete JSON or the budget ends; returns the tokens added."""
    from ..task import parse_answer

    added: list[int] = []
    while len(tokens) < closer.budget:
        text = closer.tokenizer.decode(tokens, skip_special_tokens=True)
        if parse_answer(text.strip()) is not None:
            break
        allowed = closer.allowed(tokens, text)
        if not allowed:
            break
        token, logprob = await client.next_token(model, prompt_ids + tokens, allowed)
        if token in _eos(closer.tokenizer):
            break
        tokens.append(token)
        logprobs.append(logprob)
        added.append(token)
    return added


def _eos(tokenizer: Any) -> set[int]:
    eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])
