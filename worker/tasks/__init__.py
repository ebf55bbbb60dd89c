"""The job kinds: one task per kind, in one table. Adding a job kind is one task module and one line here."""

from __future__ import annotations

from collections.abc import Callable

from worker.context import JobContext
from worker.tasks.attribution import run_attribution
from worker.tasks.edit import run_edit
from worker.tasks.fit import run_fit

JobTask = Callable[[JobContext], None]

JOB_KINDS: dict[str, JobTask] = {
    "fit": run_fit,
    "attribution": run_attribution,
    "edit": run_edit,
}
