"""Attribution methods and job kinds, each declared once (see `base.py`, `registry.py`, `jobs.py`).

This package is light: the service imports it to check requests and document options; the declarations'
`run`/`edit` callables import the engine (`worker.attribution`) only when a job calls them.
"""
