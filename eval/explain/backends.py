"""A local transformers causal LM as the explainer's writer and the simulator's reader.

The simulator needs, at each slot of its prompt (eval/explain/prompts.py), the probabilities of the
next token being "0".."10", renormalised over those 11. With a tokenizer that has "10" as one token
this is one softmax per slot. When "10" is two tokens ("1", "0"), P("10") = P("1") * P("0" | .., "1")
and P(value 1) = P("1") - P("10"); the second factor needs the model's prediction after a "1" that
is not in the prompt. Those S extra tokens ride along in the same forward pass: they are appended
after the prompt, each with the position id of its slot and an attention mask that lets it see only
the prompt before its slot and itself, so each gives exactly what a separate forward on
(prompt[:slot] + "1") would. The prompt's own rows keep the causal mask.

Detection and fuzzing (eval/explain/classifiers.py) read one-token answers (" no", " yes") at their slots
from one forward pass (`answer_distributions`).
"""

from __future__ import annotations

import torch

from sae.activations import load_model_and_tokenizer

from .http import DIGITS


class TransformersBackend:
    """Greedy generation and slot digit distributions from a local causal LM (hub name or folder)."""

    def __init__(self, model: str, device: str = "cpu", dtype: str = "float32"):
        self.model, self.tokenizer = load_model_and_tokenizer(model, dtype, device)
        self.name = f"transformers:{model}"
        self.device = next(self.model.parameters()).device
        self.digit_ids = [self.tokenizer.encode(digit, add_special_tokens=False) for digit in DIGITS]
        if any(len(ids) != 1 for ids in self.digit_ids[:10]):
            raise ValueError(f"{model}: the tokenizer does not have the digits 0-9 as single tokens")
        self.ten_is_one_token = len(self.digit_ids[10]) == 1
        if not self.ten_is_one_token and self.digit_ids[10] != [self.digit_ids[1][0], self.digit_ids[0][0]]:
            raise ValueError(f"{model}: the tokenizer splits '10' as {self.digit_ids[10]}, not as '1' '0'")
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None) or getattr(self.model.config, "n_positions", None)

    def map(self, function, items) -> list:
        return [function(item) for item in items]  # one forward at a time: the model is the bottleneck

    @torch.no_grad()
    def generate(self, prompt: str, max_tokens: int = 64, stop: list[str] | None = None) -> str:
        """Greedy continuation of `prompt`, cut at the first `stop` string (default: a newline)."""
        ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(self.device)
        if self.max_positions:
            ids = ids[:, -(self.max_positions - max_tokens) :]  # keep the end: the question is there
        output = self.model.generate(ids, max_new_tokens=max_tokens, do_sample=False,
                                     pad_token_id=self.tokenizer.eos_token_id)
        text = self.tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)
        for marker in stop or ["\n"]:
            text = text.split(marker)[0]
        return text

    def _slot_positions(self, prompt: str, slot_offsets: list[int]) -> tuple[list[int], list[int]]:
        """The prompt's token ids, and the index of the token that begins at each slot offset."""
        encoding = self.tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=False)
        ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
        token_at = {start: index for index, (start, _end) in enumerate(offsets)}
        positions = []
        for offset in slot_offsets:
            if offset not in token_at or token_at[offset] == 0:
                raise ValueError(f"no token of the prompt begins at slot offset {offset}: the tokenizer merged it with the text before")
            positions.append(token_at[offset])
        if self.max_positions and len(ids) > self.max_positions:
            raise ValueError(f"the prompt has {len(ids)} tokens; {self.name} takes at most {self.max_positions}")
        return ids, positions

    @torch.no_grad()
    def answer_distributions(self, prompt: str, slot_offsets: list[int], answers: list[str]) -> list[list[float]]:
        """For each slot, P(each of `answers`, e.g. " no", " yes") as the next token there, renormalised
        over them: one forward pass. Each answer must be one token of this tokenizer."""
        answer_ids = [self.tokenizer.encode(answer, add_special_tokens=False) for answer in answers]
        if any(len(ids) != 1 for ids in answer_ids):
            raise ValueError(f"{self.name}: the answers {list(answers)} are not one token each: {answer_ids}")
        if not slot_offsets:
            return []
        ids, positions = self._slot_positions(prompt, slot_offsets)
        log_probs = self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0].float().log_softmax(-1)
        chosen = log_probs[torch.tensor(positions, device=self.device) - 1][:, [ids[0] for ids in answer_ids]]
        return chosen.double().softmax(-1).tolist()

    @torch.no_grad()
    def digit_distributions(self, prompt: str, slot_offsets: list[int]) -> list[list[float]]:
        """For each slot (a character offset where a prompt token begins), P("0".."10") renormalised."""
        ids, positions = self._slot_positions(prompt, slot_offsets)
        n_prompt, n_slots = len(ids), len(positions)
        extra = 0 if self.ten_is_one_token else n_slots

        input_ids = torch.tensor([ids + [self.digit_ids[1][0]] * extra], device=self.device)
        position_ids = torch.tensor([list(range(n_prompt)) + positions[:extra]], device=self.device)
        allowed = torch.zeros(n_prompt + extra, n_prompt + extra, dtype=torch.bool, device=self.device)
        allowed[:n_prompt, :n_prompt] = torch.ones(n_prompt, n_prompt, dtype=torch.bool, device=self.device).tril()
        for row, position in enumerate(positions[:extra], start=n_prompt):
            allowed[row, :position] = True  # the prompt before the slot ...
            allowed[row, row] = True  # ... and the "1" itself, in the slot's place
        logits = self.model(input_ids=input_ids, attention_mask=allowed[None, None], position_ids=position_ids).logits[0]
        log_probs = logits.float().log_softmax(-1)

        single = torch.tensor([ids[0] for ids in self.digit_ids[:10]], device=self.device)
        distributions = []
        for slot, position in enumerate(positions):
            at_slot = log_probs[position - 1].exp()
            probs = torch.zeros(11, dtype=torch.float64)
            probs[:10] = at_slot[single].double()
            if self.ten_is_one_token:
                probs[10] = at_slot[self.digit_ids[10][0]].double()
            else:
                zero_after_one = log_probs[n_prompt + slot, self.digit_ids[0][0]].exp().double()
                probs[10] = probs[1] * zero_after_one
                probs[1] = probs[1] - probs[10]
            distributions.append((probs / probs.sum()).tolist())
        return distributions
