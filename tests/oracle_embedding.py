"""Test-only, line-for-line port of the Qwen3-Embedding model card's transformers usage.

Kept independent of adapter/search/dense.py on purpose (its own query format, left padding,
one padded batch, the card's `last_token_pool`) so the oracle test compares two
implementations, not one.
"""
# Requires transformers>=4.51.0
import functools

import torch
import torch.nn.functional as F

from torch import Tensor
from transformers import AutoTokenizer, AutoModel


def last_token_pool(last_hidden_states: Tensor,
                 attention_mask: Tensor) -> Tensor:
    left_padding = (attention_mask[:, -1].sum() == attention_mask.shape[0])
    if left_padding:
        return last_hidden_states[:, -1]
    else:
        sequence_lengths = attention_mask.sum(dim=1) - 1
        batch_size = last_hidden_states.shape[0]
        return last_hidden_states[torch.arange(batch_size, device=last_hidden_states.device), sequence_lengths]


def get_detailed_instruct(task_description: str, query: str) -> str:
    return f'Instruct: {task_description}\nQuery:{query}'


@functools.lru_cache(maxsize=4)
def load_card_model(model_dir):
    """The card's two loading lines (float32), cached: loading the tokenizer takes seconds."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side='left')
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return tokenizer, model


def card_embeddings(model_dir, queries, documents, task, max_length=8192):
    """The card's script as a function: (query embeddings, document embeddings, scores)."""
    # Each query must come with a one-sentence instruction that describes the task
    queries = [get_detailed_instruct(task, query) for query in queries]
    input_texts = queries + documents

    tokenizer, model = load_card_model(str(model_dir))

    # Tokenize the input texts
    batch_dict = tokenizer(
        input_texts,
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    batch_dict.to(model.device)
    with torch.no_grad():
        outputs = model(**batch_dict)
    embeddings = last_token_pool(outputs.last_hidden_state, batch_dict['attention_mask'])

    # normalize embeddings
    embeddings = F.normalize(embeddings, p=2, dim=1)
    scores = (embeddings[:len(queries)] @ embeddings[len(queries):].T)
    return embeddings[:len(queries)], embeddings[len(queries):], scores
