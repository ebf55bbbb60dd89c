"""Per-token query attribution in a job: each scored token of each causal LM query becomes its own query row.

The expansion happens once, when the job loads its request, so every method and the sharded path score the
per-token rows as ordinary queries; the labels say which query and token each row is, for the result rows.
"""

from __future__ import annotations

from tokenizers import Tokenizer

from worker.attribution import Examples
from worker.attribution.text import per_token_queries, position_ids
from worker.tasks.rows import QueryTokenLabels


def expand_queries(queries: Examples, tokenizer: Tokenizer | None) -> tuple[Examples, QueryTokenLabels]:
    """One query row per scored token (``per_token_queries``) and, per row, its query, the token's position in
    the query sequence (counted over real tokens, so padding on either side gives the same positions) and the
    scored token decoded with ``tokenizer`` (None without one)."""
    tokens = per_token_queries(queries)
    mask = queries.attention_mask
    positions = tokens.position if mask is None else position_ids(mask)[tokens.query, tokens.position]
    scored = queries.targets[tokens.query, tokens.position].tolist()
    texts: list[str | None] = (
        [None] * len(scored)
        if tokenizer is None
        else [tokenizer.decode([token], skip_special_tokens=False) for token in scored]
    )
    labels = QueryTokenLabels(query=tokens.query.cpu().numpy(), position=positions.cpu().numpy(), text=texts)
    return tokens.examples, labels
