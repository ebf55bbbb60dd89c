from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.schemas.common import EXAMPLE_TIME, StrictModel, Timestamp


class DatasetMetadata(StrictModel):
    """The `metadata` part of `POST /v1/datasets`."""

    name: str = Field(min_length=1, max_length=200)
    tokenize_with: str | None = Field(
        None,
        description="Text datasets (Parquet with `text`, or `prompt` + `completion` columns): the id of a "
        "`hf` model uploaded with a tokenizer; its tokenizer.json turns the text into `input_ids` (the `tokenizers` "
        "library: no code runs).",
    )
    max_length: int = Field(512, ge=1, le=32_768, description="Tokenized text: at most this many tokens per row.")
    truncation: bool = Field(True, description="Tokenized text: cut rows longer than max_length (else 422).")
    padding: Literal["longest", "max_length"] = Field(
        "longest", description="Tokenized text: pad rows to the longest row or to max_length."
    )
    add_special_tokens: bool = Field(True, description="Tokenized text: let the tokenizer add its special tokens.")


DATASET_EXAMPLE: dict[str, Any] = {
    "id": "ds_5e1d2c3b4a5f6e7d8c9b0a1f",
    "name": "digits-train",
    "format": "npz",
    "num_examples": 1437,
    "fields": {
        "inputs": {"dtype": "float32", "shape": [1437, 64]},
        "targets": {"dtype": "int64", "shape": [1437]},
        "ids": {"dtype": "int64", "shape": [1437]},
    },
    "created_at": EXAMPLE_TIME,
}


class DatasetOut(BaseModel):
    """A stored dataset."""

    model_config = ConfigDict(json_schema_extra={"examples": [DATASET_EXAMPLE]})

    id: str
    name: str
    format: str
    num_examples: int
    fields: dict[str, dict[str, Any]]
    created_at: Timestamp


class DatasetList(BaseModel):
    """A page of datasets, newest first."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"datasets": [DATASET_EXAMPLE], "next_page_token": None}]}
    )

    datasets: list[DatasetOut]
    next_page_token: str | None


class DatasetExample(BaseModel):
    id: int | str = Field(description="The example's id, with its own JSON type.")
    input: Any = Field(
        description="The input as nested lists of numbers (float32 values), of shape `input_shape`. Text datasets: "
        "the token ids of the example's real tokens (padding left out), so that position p is a results row's "
        "`query_token` p."
    )
    target: Any = Field(
        description="Class index, or a list of regression targets. Text datasets for causal language models: the "
        "label of each real token (-100: not scored)."
    )
    task: int | None = Field(None, description="Meta-datasets: the example's task.")
    split: int | None = Field(None, description="Meta-datasets: 0 = task train, 1 = task validation.")
    text: str | None = Field(
        None,
        description="Text datasets: the tokens decoded (with the tokenizer that made them, or the model named by "
        "`model_id`); null without a tokenizer.",
    )
    tokens: list[str] | None = Field(
        None, description="Text datasets: each token decoded on its own, one per `input` entry; null without one."
    )


class DatasetExamples(BaseModel):
    """Examples of a dataset picked by id."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "dataset_id": "ds_5e1d2c3b4a5f6e7d8c9b0a1f",
                    "input_shape": [4],
                    "examples": [{"id": 12, "input": [0.5, -1.25, 0.0, 2.0], "target": 1, "task": None, "split": None}],
                }
            ]
        }
    )

    dataset_id: str
    input_shape: list[int] = Field(
        description="Shape of one example's input (2-D or 3-D: an image); text datasets: [stored length]."
    )
    tokenizer_model_id: str | None = Field(
        None, description="Text datasets: the model whose tokenizer decoded `text` and `tokens` (null: none known)."
    )
    examples: list[DatasetExample] = Field(description="In the order the ids were asked for (repeats dropped).")
