"""Token windows for a language model: text tokenised in batches by the fast tokenizer, or a pre-tokenised dataset
read as it is.

* **Text**: documents are tokenised without special tokens, many at a time (one call of the fast tokenizer per
  :data:`TOKENIZE_BATCH` documents, or fewer long ones), each followed by EOS, and the stream is cut into windows of ``context_len``
  tokens, the first a BOS when ``prepend_bos``. A window can span documents (EOS separates them), as SAELens's and
  sparsify's do.
* **Pre-tokenised rows** (an ``input_ids`` or ``tokens`` column, as SAELens's pretokenize runner and sparsify write
  them): each row is one whole context, taken as it is. Its length must be ``context_len``; with ``prepend_bos`` its
  first token must be BOS, and without it must not be, so that ``drop_bos`` leaves out exactly the BOS positions.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

import torch
from torch import Tensor

#: the columns that hold a pre-tokenised context, in the order they are looked for
TOKEN_COLUMNS = ("input_ids", "tokens")
#: documents tokenised per call of the fast tokenizer, at most, and characters (a batch ends past them): the first
#: window then waits for a few documents, not for a whole batch of long ones
TOKENIZE_BATCH, TOKENIZE_CHARS = 256, 200_000


def token_column(row: dict[str, Any]) -> str | None:
    """The column of a dataset row holding a pre-tokenised context, or None (a text dataset)."""
    return next((c for c in TOKEN_COLUMNS if c in row), None)


def text_windows(texts: Iterable[str], tokenizer: Any, body: int, bos: int | None) -> Iterator[Tensor]:
    """Windows of ``body`` tokens of the texts joined by EOS, each with ``bos`` in front when it is not None."""
    eos = tokenizer.eos_token_id
    head = [] if bos is None else [bos]
    stream: list[int] = []
    texts = iter(texts)
    while batch := _batch(texts):
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            stream += ids
            if eos is not None:
                stream.append(eos)
        start = 0
        while len(stream) - start >= body:
            yield torch.tensor(head + stream[start:start + body])
            start += body
        del stream[:start]


def _batch(texts: Iterator[str]) -> list[str]:
    """The next documents to tokenise together: up to :data:`TOKENIZE_BATCH`, or fewer once they hold
    :data:`TOKENIZE_CHARS` characters."""
    batch, chars = [], 0
    for text in islice(texts, TOKENIZE_BATCH):
        batch.append(text)
        chars += len(text)
        if chars >= TOKENIZE_CHARS:
            break
    return batch


def token_rows(rows: Iterable[dict[str, Any]], column: str, context_len: int, prepend_bos: bool, bos: int | None,
               source: str) -> Iterator[Tensor]:
    """The contexts of pre-tokenised ``rows`` (their ``column``), checked against the recipe's length and BOS
    handling (``bos``: the tokenizer's BOS id); ``source`` names the dataset in the errors."""
    for i, row in enumerate(rows):
        ids = row[column]
        if len(ids) != context_len:
            raise ValueError(f"data.context_len: {source} is pre-tokenised with contexts of {len(ids)} tokens (row {i}, "
                             f"column {column!r}), and the recipe asks {context_len}; set data.context_len={len(ids)}")
        if i == 0 and bos is not None and (int(ids[0]) == bos) != prepend_bos:
            raise ValueError(f"data.prepend_bos: {source}'s contexts {'do not start' if prepend_bos else 'start'} with "
                             f"BOS (row 0 starts with token {int(ids[0])}, BOS is {bos}); set data.prepend_bos="
                             f"{str(not prepend_bos).lower()}")
        yield torch.as_tensor(ids, dtype=torch.long)
