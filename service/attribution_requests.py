"""Up-front checks of `POST /v1/attributions` and `POST /v1/fits`: what can be known before queuing is a 4xx."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import math

import torch
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.artifacts import model_spec, owned_dataset, owned_model
from service.db.tables import Checkpoint, Dataset, Fit, Job, Model
from service.hf_requests import check_hf_inputs
from service.problems import FieldError, ProblemError, invalid, not_found
from service.schemas.attributions import AttributionIn
from service.schemas.options import FIT_LEVEL_FIELDS, OPTIONS_BY_METHOD, StrictModel
from service.settings import Settings
from worker.artifacts.spec import build_module

META_METHODS = ("meta_task_influence", "meta_instance_influence")
DEFAULT_BATCH_SIZE = 256
ACTIVATION_COPIES = 3
TRAJECTORY_METHODS = ("source", "tracin")


@dataclass
class CheckedAttribution:
    models: list[Model]
    train: Dataset
    query: Dataset | None
    options: StrictModel
    fit: Fit | None


def parse_options(method: str, raw: dict[str, Any]) -> StrictModel:
    try:
        return OPTIONS_BY_METHOD[method].model_validate(raw)
    except ValidationError as exc:
        errors = [
            FieldError(field=".".join(["body", "options", *(str(p) for p in e["loc"])]), message=e["msg"])
            for e in exc.errors()
        ]
        summary = "; ".join(f"{e.field}: {e.message}" for e in errors[:5])
        raise ProblemError(422, f"invalid options for method {method!r}: {summary}", kind="invalid-input",
                           title="Invalid input", errors=errors) from exc


def check_attribution(session: Session, tenant_id: str, request: AttributionIn, settings: Settings) -> CheckedAttribution:
    max_top_k = settings.max_top_k
    models = [owned_model(session, tenant_id, model_id) for model_id in request.all_model_ids]
    _check_ensemble(models)
    loss = models[0].task["loss"]
    train = owned_dataset(session, tenant_id, request.train_dataset_id)
    query = _query_dataset(session, tenant_id, request)
    options = parse_options(request.method, request.options)
    if request.top_k > max_top_k:
        raise invalid(f"top_k may be at most {max_top_k}", "body.top_k")
    if request.measurement == "margin" and loss != "cross_entropy":
        raise invalid("measurement \"margin\" needs a classifier (task loss cross_entropy)", "body.measurement")
    for dataset, field in ((train, "body.train_dataset_id"), (query, "body.query_dataset_id")):
        if dataset is not None:
            check_inputs_fit(models[0], dataset, field, settings.max_activation_bytes, _batch_size(options))
    if request.method in META_METHODS:
        _check_meta(request, train, query)
    if request.method in TRAJECTORY_METHODS:
        _check_trajectory(session, tenant_id, request, models, options, settings)
    fit = _check_fit(session, tenant_id, request, models, train, options)
    return CheckedAttribution(models=models, train=train, query=query, options=options, fit=fit)


def _check_ensemble(models: list[Model]) -> None:
    first = models[0]
    for other in models[1:]:
        if other.architecture != first.architecture or other.task != first.task:
            raise invalid(f"model {other.id!r} has another architecture or task than {first.id!r}; an ensemble "
                          "needs models of one architecture", "body.model_ids")
    if len({m.id for m in models}) != len(models):
        raise invalid("model_ids repeats a model", "body.model_ids")


def _query_dataset(session: Session, tenant_id: str, request: AttributionIn) -> Dataset | None:
    if request.mode == "self":
        if request.query_dataset_id is not None:
            raise invalid("mode \"self\" takes no query dataset", "body.query_dataset_id")
        return None
    if request.query_dataset_id is None:
        raise invalid(f"mode {request.mode!r} needs query_dataset_id", "body.query_dataset_id")
    return owned_dataset(session, tenant_id, request.query_dataset_id)


def _batch_size(options: StrictModel) -> int:
    return int(getattr(options, "batch_size", DEFAULT_BATCH_SIZE))


def check_inputs_fit(
    model: Model, dataset: Dataset, field: str, max_activation_bytes: int, batch_size: int = DEFAULT_BATCH_SIZE
) -> None:
    """Run the architecture on one example of the dataset's input shape, on the meta device (no memory), and
    refuse work whose activations would not fit: every module's output for a batch, kept for the backward pass
    with its gradient and the engine's per-layer statistics (about three float32 copies). A `format: "hf"` model
    is checked from its config instead, and so is a text dataset (service.hf_requests)."""
    if model.format == "hf" or "inputs" not in dataset.fields:
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
        except Exception as exc:  # noqa: BLE001  (a shape error of any kind means "does not fit")
            raise invalid(f"the inputs of dataset {dataset.id!r} (shape {shape}) do not fit model {model.id!r}: "
                          f"{exc}", field) from exc
        finally:
            for handle in handles:
                handle.remove()
    estimate = ACTIVATION_COPIES * 4 * batch_size * (sum(outputs) + math.prod(shape[1:]))
    if estimate > max_activation_bytes:
        raise invalid(
            f"model {model.id!r} on inputs of shape {shape[1:]} needs about {estimate / 1024**3:.1f} GiB of "
            f"activations for a batch of {batch_size} (at most {max_activation_bytes / 1024**3:.1f} GiB): use a "
            "smaller options.batch_size or a smaller model", field)


def _numel(output: object) -> int:
    if isinstance(output, torch.Tensor):
        return output.numel()
    if isinstance(output, (tuple, list)):
        return sum(_numel(item) for item in output)
    return 0


def _check_meta(request: AttributionIn, train: Dataset, query: Dataset | None) -> None:
    if request.mode == "self":
        raise invalid("meta methods have no \"self\" mode", "body.mode")
    if request.measurement != "loss":
        raise invalid("meta methods measure the post-adaptation loss: measurement must be \"loss\"", "body.measurement")
    removal = (request.options or {}).get("removal", "first_order")
    if removal == "newton" and request.method != "meta_task_influence":
        raise invalid("options.removal \"newton\" applies to meta_task_influence; instance influence is first order",
                      "body.options.removal")
    if removal == "newton" and (request.options or {}).get("solver", "cg") == "neumann":
        raise invalid("options.removal \"newton\" needs solver \"exact\" or \"cg\"", "body.options.solver")
    for dataset, field in ((train, "body.train_dataset_id"), (query, "body.query_dataset_id")):
        if dataset is not None and not {"task", "split"} <= set(dataset.fields):
            raise invalid(f"dataset {dataset.id!r} is not a meta-dataset: it needs `task` and `split` fields", field)


def _check_trajectory(
    session: Session, tenant_id: str, request: AttributionIn, models: list[Model], options: StrictModel,
    settings: Settings,
) -> None:
    if len(models) != 1:
        raise invalid(f"method {request.method!r} takes one model (model_id), not an ensemble", "body.model_ids")
    checkpoints = list(session.scalars(select(Checkpoint).where(Checkpoint.model_id == models[0].id)))
    if not checkpoints:
        raise invalid(f"method {request.method!r} needs the model's training checkpoints: upload them with "
                      f"POST /v1/models/{models[0].id}/checkpoints", "body.model_id")
    stages = sorted({c.stage for c in checkpoints})
    adam = sorted({c.stage for c in checkpoints if (c.optimizer or "sgd") != "sgd"})
    if request.method == "source" and adam:
        raise invalid(f"the checkpoints of stage(s) {adam} were trained with an Adam-type optimizer: SOURCE supports "
                      "SGD (with momentum) trajectories only; the diagonal approximation for Adam (appendix C of the "
                      "SOURCE paper) is not implemented yet. Use method \"tracin\" or \"influence\"", "body.model_id")
    wanted = getattr(options, "stages", None)
    for stage in wanted or []:
        if stage not in stages:
            raise invalid(f"stage {stage} has no checkpoint (stages with checkpoints: {stages})", "body.options.stages")
    stage_datasets: dict[str, str] = getattr(options, "stage_datasets", None) or {}
    for key, dataset_id in stage_datasets.items():
        if not key.isdigit() or int(key) not in stages:
            raise invalid(f"stage_datasets names stage {key!r}, which has no checkpoint (stages: {stages})",
                          "body.options.stage_datasets")
        check_inputs_fit(models[0], owned_dataset(session, tenant_id, dataset_id), "body.options.stage_datasets",
                         settings.max_activation_bytes, _batch_size(options))
    if len(stages) > 1 and stage_datasets:
        missing = [s for s in stages if str(s) not in stage_datasets]
        if missing:
            raise invalid(f"stage_datasets has no dataset for stage(s) {missing}", "body.options.stage_datasets")
    _check_attributed_stages(request, stages, stage_datasets, wanted)
    segments = getattr(options, "segments", None)
    if isinstance(segments, int):
        steps = len({(c.stage, c.step) for c in checkpoints})
        if segments < 1 or segments > steps:
            raise invalid(f"segments must be between 1 and the number of checkpoints ({steps}); {segments} would "
                          "leave a segment with no checkpoint", "body.options.segments")


def _check_attributed_stages(
    request: AttributionIn, stages: list[int], stage_datasets: dict[str, str], wanted: list[int] | None
) -> None:
    """The attributed stages must train on train_dataset_id (their segments score its examples)."""
    dataset_of = {s: stage_datasets.get(str(s), request.train_dataset_id) for s in stages}
    attributed = wanted if wanted is not None else [s for s in stages if dataset_of[s] == request.train_dataset_id]
    if not attributed:
        raise invalid("no stage to attribute: no stage trains on train_dataset_id (see options.stage_datasets) "
                      "and options.stages names none", "body.options.stages")
    other = [s for s in attributed if dataset_of[s] != request.train_dataset_id]
    if other:
        raise invalid(f"stage(s) {other} train on another dataset than train_dataset_id, so their data are not "
                      "the attributed examples", "body.options.stages")


def _check_fit(
    session: Session, tenant_id: str, request: AttributionIn, models: list[Model], train: Dataset,
    options: StrictModel,
) -> Fit | None:
    if request.fit_id is None:
        return None
    fit = owned_fit(session, tenant_id, request.fit_id)
    if request.method != "influence":
        raise invalid(f"fit_id is used by method \"influence\", not {request.method!r}", "body.fit_id")
    if len(models) != 1 or fit.model_id != models[0].id:
        raise invalid(f"fit {fit.id!r} was made for model {fit.model_id!r}", "body.fit_id")
    if fit.dataset_id != train.id:
        raise invalid(f"fit {fit.id!r} was made on dataset {fit.dataset_id!r}, not the training dataset", "body.fit_id")
    job = session.get(Job, fit.job_id)
    if job is None or job.status != "succeeded":
        raise ProblemError(409, f"fit {fit.id!r} is not ready (its job is {job.status if job else 'missing'})",
                           kind="fit-not-ready")
    requested = options.model_dump()
    given = set(request.options)
    for name in FIT_LEVEL_FIELDS:
        if name in given and requested.get(name) != fit.options.get(name):
            raise invalid(f"option {name}={requested.get(name)!r} differs from fit {fit.id!r} "
                          f"({fit.options.get(name)!r}); leave it out or make a new fit", f"body.options.{name}")
    return fit


def owned_fit(session: Session, tenant_id: str, fit_id: str) -> Fit:
    fit = session.get(Fit, fit_id)
    if fit is None or fit.tenant_id != tenant_id:
        raise not_found("fit", fit_id)
    return fit


def owned_checkpoints(session: Session, model: Model, checkpoint_ids: list[str]) -> list[Checkpoint]:
    found = []
    for checkpoint_id in checkpoint_ids:
        checkpoint = session.get(Checkpoint, checkpoint_id)
        if checkpoint is None or checkpoint.model_id != model.id:
            raise invalid(f"checkpoint {checkpoint_id!r} is not a checkpoint of model {model.id!r}",
                          "body.checkpoint_ids")
        found.append(checkpoint)
    return found
