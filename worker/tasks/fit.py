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
        fit = session.scalar(select(Fit).where(Fit.job_id == context.job_id))
        model = session.get(Model, fit.model_id)  # type: ignore[union-attr]
        dataset = session.get(Dataset, fit.dataset_id)  # type: ignore[union-attr]
        checkpoints = [session.get(Checkpoint, c) for c in (fit.checkpoint_ids or [])]  # type: ignore[union-attr]
    assert fit is not None and model is not None and dataset is not None
    train, _ = load_examples(context.store, dataset)
    options = fit_options(fit_settings(fit.options))
    loss = loss_name(model.task["loss"])
    targets = {"model": load_model(context.store, model)} if not checkpoints else {
        c.id: load_checkpoint(context.store, model, c) for c in checkpoints if c is not None
    }
    curvatures = {
        name: fit_curvature(module, train, loss, options, progress=context.progress, device=context.device)
        for name, module in targets.items()
    }
    with context.session() as session:
        blob = put_curvatures(session, context.store, curvatures)
        stored = session.get(Fit, fit.id)
        stored.artifact_sha256 = blob.sha256  # type: ignore[union-attr]
        context.succeed(session)
