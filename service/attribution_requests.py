"""Up-front checks of `POST /v1/attributions` and `POST /v1/fits`: what can be known before queuing is a 4xx."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.artifacts import model_spec
from service.db.tables import Checkpoint, Dataset, Fit, Job, Model
from service.hf_requests import check_hf_inputs
from service.ownership import owned
from service.problems import ProblemError, invalid
from service.schemas.attributions import AttributionRequest
from service.schemas.common import StrictModel
from service.schemas.options import DEFAULT_BATCH_SIZE, FIT_LEVEL_FIELDS, TrajectoryOptions
from service.settings import Settings
from worker.artifacts.formats import HF_FORMATS
from worker.artifacts.spec import build_module
from worker.methods.base import CheckpointFacts, Method, MethodInputError
from worker.methods.registry import all_methods, get_method
from worker.methods.stages import stage_plan

ACTIVATION_COPIES = 3


@dataclass
class CheckedAttribution:
    method: Method
    models: list[Model]
    train: Dataset
    query: Dataset | None
    options: StrictModel
    fit: Fit | None


def check_attribution(
    session: Session, tenant_id: str, request: AttributionRequest, settings: Settings
) -> CheckedAttribution:
    """The request checked against what its method declares before queuing. Modes and measurements are already
    enforced by the method's request model (`service.schemas.attributions.request_model`); here: the inputs."""
    method = get_method(request.method)
    options = request.options
    max_top_k = settings.max_top_k
    models = [owned(session, Model, tenant_id, model_id) for model_id in request.all_model_ids]
    _check_ensemble(models)
    loss = models[0].task["loss"]
    train = owned(session, Dataset, tenant_id, request.train_dataset_id)
    query = _query_dataset(session, tenant_id, request)
    if request.top_k > max_top_k:
        raise invalid(f"top_k may be at most {max_top_k}", "body.top_k")
    if request.measurement == "margin" and loss != "cross_entropy":
        raise invalid('measurement "margin" needs a classifier (task loss cross_entropy)', "body.measurement")
    if request.per_token:
        _check_per_token(request, method, loss)
    for dataset, field in ((train, "body.train_dataset_id"), (query, "body.query_dataset_id")):
        if dataset is not None:
            check_inputs_fit(models[0], dataset, field, settings.max_activation_bytes, _batch_size(options))
    if method.needs_meta_datasets:
        _check_meta_datasets(train, query)
    if method.needs_checkpoints:
        _check_trajectory(session, tenant_id, request, method, models, settings)
    fit = _check_fit(session, tenant_id, request, method, models, train)
    return CheckedAttribution(method=method, models=models, train=train, query=query, options=options, fit=fit)


def _check_per_token(request: AttributionRequest, method: Method, loss: str) -> None:
    """Per-token attribution splits causal LM queries into their scored tokens: pairwise rankings of example
    queries only."""
    if loss != "causal_lm":
        raise invalid(f"per_token needs a causal language model (task loss causal_lm), not {loss!r}", "body.per_token")
    if request.mode != "pairwise":
        raise invalid(
            f'per_token ranks per query token: it needs mode "pairwise", not {request.mode!r}', "body.per_token"
        )
    if method.query_unit != "example":
        raise invalid(f"method {method.name!r} ranks for tasks, not query examples: no per_token", "body.per_token")


def _check_ensemble(models: list[Model]) -> None:
    first = models[0]
    for other in models[1:]:
        if other.architecture != first.architecture or other.task != first.task:
            raise invalid(
                f"model {other.id!r} has another architecture or task than {first.id!r}; an ensemble "
                "needs models of one architecture",
                "body.model_ids",
            )
    if len({m.id for m in models}) != len(models):
        raise invalid("model_ids repeats a model", "body.model_ids")


def _query_dataset(session: Session, tenant_id: str, request: AttributionRequest) -> Dataset | None:
    if request.mode == "self":
        if request.query_dataset_id is not None:
            raise invalid('mode "self" takes no query dataset', "body.query_dataset_id")
        return None
    if request.query_dataset_id is None:
        raise invalid(f"mode {request.mode!r} needs query_dataset_id", "body.query_dataset_id")
    return owned(session, Dataset, tenant_id, request.query_dataset_id)


def _batch_size(options: StrictModel) -> int:
    batch_size = getattr(options, "batch_size", DEFAULT_BATCH_SIZE)
    return batch_size if isinstance(batch_size, int) else DEFAULT_BATCH_SIZE


def check_inputs_fit(
    model: Model, dataset: Dataset, field: str, max_activation_bytes: int, batch_size: int = DEFAULT_BATCH_SIZE
) -> None:
    """Run the architecture on one example of the dataset's input shape, on the meta device (no memory), and
    refuse work whose activations would not fit: every module's output for a batch, kept for the backward pass
    with its gradient and the engine's per-layer statistics (about three float32 copies). A `format: "hf"` (or
    `"lora"`) model is checked from its config instead, and so is a text dataset (service.hf_requests)."""
    if model.format in HF_FORMATS or "inputs" not in dataset.fields:
        check_hf_inputs(model, dataset, field)
        return
    shape = dataset.fields["inputs"]["shape"]
    outputs: list[int] = []
    with torch.device("meta"):
        module = build_module(model_spec(model))
        probe = torch.zeros((1, *shape[1:]))
        handles = [m.register_forward_hook(lambda _m, _i, out: outputs.append(_numel(out))) for m in module.modules()]
        try:
            module.eval()(probe)
        except Exception as exc:
            raise invalid(
                f"the inputs of dataset {dataset.id!r} (shape {shape}) do not fit model {model.id!r}: {exc}", field
            ) from exc
        finally:
            for handle in handles:
                handle.remove()
    estimate = ACTIVATION_COPIES * 4 * batch_size * (sum(outputs) + math.prod(shape[1:]))
    if estimate > max_activation_bytes:
        raise invalid(
            f"model {model.id!r} on inputs of shape {shape[1:]} needs about {estimate / 1024**3:.1f} GiB of "
            f"activations for a batch of {batch_size} (at most {max_activation_bytes / 1024**3:.1f} GiB): use a "
            "smaller options.batch_size or a smaller model",
            field,
        )


def _numel(output: object) -> int:
    if isinstance(output, torch.Tensor):
        return output.numel()
    if isinstance(output, (tuple, list)):
        return sum(_numel(item) for item in output)
    return 0


def _check_meta_datasets(train: Dataset, query: Dataset | None) -> None:
    for dataset, field in ((train, "body.train_dataset_id"), (query, "body.query_dataset_id")):
        if dataset is not None and not {"task", "split"} <= set(dataset.fields):
            raise invalid(f"dataset {dataset.id!r} is not a meta-dataset: it needs `task` and `split` fields", field)


def _check_trajectory(
    session: Session,
    tenant_id: str,
    request: AttributionRequest,
    method: Method,
    models: list[Model],
    settings: Settings,
) -> None:
    if len(models) != 1:
        raise invalid(f"method {method.name!r} takes one model (model_id), not an ensemble", "body.model_ids")
    checkpoints = list(session.scalars(select(Checkpoint).where(Checkpoint.model_id == models[0].id)))
    if not checkpoints:
        raise invalid(
            f"method {method.name!r} needs the model's training checkpoints: upload them with "
            f"POST /v1/models/{models[0].id}/checkpoints",
            "body.model_id",
        )
    facts = [CheckpointFacts(stage=c.stage, step=c.step, optimizer=c.optimizer or "sgd") for c in checkpoints]
    options = request.options
    if not isinstance(options, TrajectoryOptions):
        raise TypeError(f"method {method.name!r} reads checkpoints: its options must extend TrajectoryOptions")
    try:
        if method.check_checkpoints is not None:
            method.check_checkpoints(options, facts)
        stage_plan(options, sorted({c.stage for c in facts}), request.train_dataset_id)
    except MethodInputError as exc:
        raise invalid(exc.message, exc.field) from exc
    for dataset_id in (options.stage_datasets or {}).values():
        check_inputs_fit(
            models[0],
            owned(session, Dataset, tenant_id, dataset_id),
            "body.options.stage_datasets",
            settings.max_activation_bytes,
            _batch_size(options),
        )


def _check_fit(
    session: Session,
    tenant_id: str,
    request: AttributionRequest,
    method: Method,
    models: list[Model],
    train: Dataset,
) -> Fit | None:
    if request.fit_id is None:
        return None
    fit = owned(session, Fit, tenant_id, request.fit_id)
    if not method.accepts_fit:
        users = " or ".join(f'"{m.name}"' for m in all_methods() if m.accepts_fit)
        raise invalid(f"fit_id is used by method {users}, not {method.name!r}", "body.fit_id")
    if len(models) != 1 or fit.model_id != models[0].id:
        raise invalid(f"fit {fit.id!r} was made for model {fit.model_id!r}", "body.fit_id")
    if fit.dataset_id != train.id:
        raise invalid(f"fit {fit.id!r} was made on dataset {fit.dataset_id!r}, not the training dataset", "body.fit_id")
    job = session.get(Job, fit.job_id)
    if job is None or job.status != "succeeded":
        raise ProblemError(
            409, f"fit {fit.id!r} is not ready (its job is {job.status if job else 'missing'})", kind="fit-not-ready"
        )
    requested = request.options.model_dump()
    given = request.options.model_fields_set
    for name in FIT_LEVEL_FIELDS:
        if name in given and requested.get(name) != fit.options.get(name):
            raise invalid(
                f"option {name}={requested.get(name)!r} differs from fit {fit.id!r} "
                f"({fit.options.get(name)!r}); leave it out or make a new fit",
                f"body.options.{name}",
            )
    return fit


def owned_checkpoints(session: Session, model: Model, checkpoint_ids: list[str]) -> list[Checkpoint]:
    found = []
    for checkpoint_id in checkpoint_ids:
        checkpoint = session.get(Checkpoint, checkpoint_id)
        if checkpoint is None or checkpoint.model_id != model.id:
            raise invalid(
                f"checkpoint {checkpoint_id!r} is not a checkpoint of model {model.id!r}", "body.checkpoint_ids"
            )
        found.append(checkpoint)
    return found
