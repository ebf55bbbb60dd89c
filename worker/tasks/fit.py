"""The fit job: fit a curvature on the training data (at the model, or at each chosen checkpoint), store it."""

from __future__ import annotations

from sqlalchemy import select

from service.db.tables import Checkpoint, Dataset, Fit, Model
from worker.attribution import fit_curvature
from worker.context import JobContext
from worker.loading import load_checkpoint, load_examples, load_model, put_curvatures
from worker.methods.engine_options import fit_options
from worker.tasks.options import fit_settings, loss_name


def run_fit(context: JobContext) -> None:
    with context.session() as session:
        fit = session.scalars(select(Fit).where(Fit.job_id == context.job_id)).one()
        model = session.get_one(Model, fit.model_id)
        dataset = session.get_one(Dataset, fit.dataset_id)
        checkpoints = [session.get(Checkpoint, c) for c in (fit.checkpoint_ids or [])]
    train, _ = load_examples(context.store, dataset)
    options = fit_options(fit_settings(fit.options))
    loss = loss_name(model.task["loss"])
    targets = (
        {"model": load_model(context.store, model)}
        if not checkpoints
        else {c.id: load_checkpoint(context.store, model, c) for c in checkpoints if c is not None}
    )
    curvatures = {
        name: fit_curvature(module, train, loss, options, progress=context.progress, device=context.device)
        for name, module in targets.items()
    }
    with context.session() as session:
        blob = put_curvatures(session, context.store, curvatures)
        stored = session.get_one(Fit, fit.id)
        stored.artifact_sha256 = blob.sha256
        context.succeed(session)
