"""Attribution methods and job kinds, each declared once (see `base.py`, `registry.py`, `jobs.py`).

The service imports this package to check requests and document options: it holds no job code (it imports
neither `worker.tasks` nor `worker.runner`, nor the database), and the declarations' `run`/`edit` callables
import the engine's method modules only when a job calls them.
"""
