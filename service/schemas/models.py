from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.schemas.common import EXAMPLE_TIME, StrictModel, Timestamp
from service.schemas.diagnostics import EditDiagnostics


class ModelTask(StrictModel):
    loss: Literal["cross_entropy", "mse", "causal_lm"] = Field(
        description="What the model is trained for. `causal_lm` (token cross-entropy, labels -100 ignored) needs "
        "format `hf`."
    )
    head: Literal["sequence_classification", "image_classification"] | None = Field(
        None,
        description="Format `hf` with loss `cross_entropy` or `mse`: the transformers head the model has "
        "(AutoModelForSequenceClassification / AutoModelForImageClassification). Not for `spec`.",
    )


class ModelMetadata(StrictModel):
    """The `metadata` part of `POST /v1/models`."""

    name: str = Field(min_length=1, max_length=200)
    format: Literal["spec", "hf", "lora", "onnx"] = Field(
        "spec",
        description="`spec` (a declarative torch.nn.Sequential), `hf` (a Hugging Face transformers "
        "config.json + safetensors) or `lora` (a peft LoRA adapter on a stored `hf` model), see "
        "`GET /v1/models/formats`. `onnx` is not supported yet (422).",
    )
    architecture: dict[str, Any] = Field(
        default_factory=dict,
        description='For `spec`: `{"type": "sequential", "layers": [...]}`. For `hf`: '
        "left out (the `config` part is the architecture).",
    )
    task: ModelTask
    base_model_id: str | None = Field(
        None,
        max_length=40,
        description="Format `lora`: the stored format `hf` model the adapter was trained on (the task must be "
        "its task).",
    )


MODEL_EXAMPLE: dict[str, Any] = {
    "id": "mdl_3f9c0e6a1b2c4d5e6f7a8b9c",
    "name": "digits-mlp",
    "format": "spec",
    "num_parameters": 9610,
    "tracked_layers": ["0", "2"],
    "architecture": {
        "type": "sequential",
        "layers": [
            {"type": "linear", "in_features": 64, "out_features": 128},
            {"type": "relu"},
            {"type": "linear", "in_features": 128, "out_features": 10},
        ],
    },
    "task": {"loss": "cross_entropy"},
    "base_model_id": None,
    "source_attribution_id": None,
    "edit_diagnostics": None,
    "created_at": EXAMPLE_TIME,
}
CHECKPOINT_EXAMPLE: dict[str, Any] = {
    "id": "ckpt_2b3c4d5e6f7a8b9c0d1e2f3a",
    "model_id": "mdl_3f9c0e6a1b2c4d5e6f7a8b9c",
    "step": 500,
    "learning_rate": 0.05,
    "momentum": 0.9,
    "stage": 0,
    "optimizer": "sgd",
    "created_at": EXAMPLE_TIME,
}


class ModelOut(BaseModel):
    """A stored model."""

    model_config = ConfigDict(json_schema_extra={"examples": [MODEL_EXAMPLE]})

    id: str
    name: str
    format: str
    num_parameters: int
    tracked_layers: list[str]
    architecture: dict[str, Any]
    task: dict[str, Any]
    base_model_id: str | None = Field(None, description="Format `lora`: the `hf` model the adapter is on.")
    source_attribution_id: str | None = Field(None, description="Set on models made by `/edit`.")
    edit_diagnostics: EditDiagnostics | None = Field(
        None,
        description="Models made by `/edit`: the estimator, proximity λ, step norm relative to the weights, "
        "remaining-data training loss before and after, the change of the attribution's query losses, warnings.",
    )
    created_at: Timestamp


class ModelFormats(BaseModel):
    """The model formats `POST /v1/models` accepts."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "formats": [
                        {"name": "spec", "parts": ["weights"], "losses": ["cross_entropy", "mse"]},
                        {
                            "name": "hf",
                            "parts": ["config", "weights", "weights_index", "tokenizer", "tokenizer_config", "archive"],
                            "model_types": [
                                "gpt2",
                                "llama",
                                "qwen2",
                                "mistral",
                                "bert",
                                "roberta",
                                "distilbert",
                                "vit",
                            ],
                        },
                    ],
                    "not_supported_yet": ["onnx"],
                }
            ]
        }
    )

    formats: list[dict[str, Any]] = Field(
        description="Each accepted format: name, parts, losses; for `hf` the allow-listed model_types by head."
    )
    not_supported_yet: list[str]


class ModelList(BaseModel):
    """A page of models, newest first."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"models": [MODEL_EXAMPLE], "next_page_token": None}]})

    models: list[ModelOut]
    next_page_token: str | None


class CheckpointMetadata(StrictModel):
    """The `metadata` part of `POST /v1/models/{id}/checkpoints`."""

    step: int = Field(ge=0)
    learning_rate: float = Field(gt=0, allow_inf_nan=False)
    stage: int = Field(0, ge=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    optimizer: Literal["sgd", "adam"] = Field(
        "sgd",
        description="The optimizer of this step: `sgd` (with momentum) or `adam` (Adam-type). SOURCE does "
        "not support Adam-type trajectories yet (422); TracInCP does.",
    )


class CheckpointOut(BaseModel):
    """A stored training checkpoint of a model."""

    model_config = ConfigDict(json_schema_extra={"examples": [CHECKPOINT_EXAMPLE]})

    id: str
    model_id: str
    step: int
    learning_rate: float
    momentum: float
    stage: int
    optimizer: str = "sgd"
    created_at: Timestamp


class CheckpointList(BaseModel):
    """A page of checkpoints by (stage, step)."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"checkpoints": [CHECKPOINT_EXAMPLE], "next_page_token": None}]}
    )

    checkpoints: list[CheckpointOut]
    next_page_token: str | None
