"""The fit job: fit a curvature on the training data (at the model, or at each chosen checkpoint), store it.

A training set larger than a shard (``ATTRIB_SHARD_EXAMPLES``) is fitted in shards (`worker.tasks.sharded_fit`).
"""

from __future__ import annotations

from service.db.tables import Fit
from worker.attribution import fit_curvature
from worker.context import JobContext
from worker.loading import put_curvatures


def run_fit(context: JobContext) -> None:
    from worker.tasks.sharded_fit import fit_shard_plan, load_fit_request, run_sharded_fit

    request = load_fit_request(context)
    if (ranges := fit_shard_plan(context, request)) is not None:
        run_sharded_fit(context, request, ranges)
        return
    curvatures = {
        name: fit_curvature(
            module, request.train, request.loss, request.options, progress=context.progress, device=context.device
        )
        for name, module in request.targets.items()
    }
    with context.session() as session:
        blob = put_curvatures(session, context.store, curvatures)
        stored = session.get_one(Fit, request.fit_id)
        stored.artifact_sha256 = blob.sha256
        context.succeed(session)
