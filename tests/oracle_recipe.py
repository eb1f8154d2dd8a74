"""Test-only, line-for-line port of the Qwen3-Reranker model card's transformers recipe.

Kept independent of adapter/rerank/qwen3.py on purpose (its own strings, ids, padding and
full-vocabulary logits) so that the oracle test compares two implementations, not one.
The benchmark times it as "card".
"""
from __future__ import annotations

import torch

CARD_TASK = "Given a web search query, retrieve relevant passages that answer the query"


def format_instruction(instruction, query, doc):
    if instruction is None:
        instruction = CARD_TASK
    output = "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}".format(
        instruction=instruction, query=query, doc=doc)
    return output


class CardRecipe:
    """The card's process_inputs / compute_logits around a loaded model and tokenizer."""

    prefix = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the "
              "Query and the Instruct provided. Note that the answer can only be \"yes\" or \"no\"."
              "<|im_end|>\n<|im_start|>user\n")
    suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"

    def __init__(self, model, tokenizer, max_length=8192, yes="yes", no="no",
                 truncation_side="right"):
        # The card: AutoTokenizer.from_pretrained(..., padding_side='left')
        tokenizer.padding_side = "left"
        tokenizer.truncation_side = truncation_side  # only the negative controls change it
        self.tokenizer, self.model, self.max_length = tokenizer, model.eval(), max_length
        self.token_false_id = tokenizer.convert_tokens_to_ids(no)
        self.token_true_id = tokenizer.convert_tokens_to_ids(yes)
        self.prefix_tokens = tokenizer.encode(self.prefix, add_special_tokens=False)
        self.suffix_tokens = tokenizer.encode(self.suffix, add_special_tokens=False)

    def process_inputs(self, pairs):
        inputs = self.tokenizer(
            pairs, padding=False, truncation='longest_first',
            return_attention_mask=False,
            max_length=self.max_length - len(self.prefix_tokens) - len(self.suffix_tokens)
        )
        for i, ele in enumerate(inputs['input_ids']):
            inputs['input_ids'][i] = self.prefix_tokens + ele + self.suffix_tokens
        inputs = self.tokenizer.pad(inputs, padding=True, return_tensors="pt",
                                    max_length=self.max_length)
        for key in inputs:
            inputs[key] = inputs[key].to(self.model.device)
        return inputs

    @torch.no_grad()
    def compute_logits(self, inputs, **kwargs):
        batch_scores = self.model(**inputs).logits[:, -1, :]
        true_vector = batch_scores[:, self.token_true_id]
        false_vector = batch_scores[:, self.token_false_id]
        batch_scores = torch.stack([false_vector, true_vector], dim=1)
        batch_scores = torch.nn.functional.log_softmax(batch_scores, dim=1)
        scores = batch_scores[:, 1].exp().tolist()
        return scores

    def score(self, query, documents, instruction=None, batch_size=16):
        """The card's loop over fixed-size batches in the given order."""
        pairs = [format_instruction(instruction, query, doc) for doc in documents]
        scores = []
        for start in range(0, len(pairs), batch_size):
            scores.extend(self.compute_logits(self.process_inputs(pairs[start:start + batch_size])))
        return scores
