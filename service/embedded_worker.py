"""The embedded worker process: Celery's worker command, minus its warning about running as root.

`attrib serve` starts this worker itself, as the same user; the container image runs as a non-root user, and
where someone runs the embedded default as root on purpose (a throwaway VM, CI) Celery's 8-line superuser
warning on every start says nothing they can act on. Messages are JSON only, never pickle, which is what that
warning is about.
"""

from __future__ import annotations

import os
import sys
import warnings


def main() -> None:
    from celery.__main__ import main as celery_main
    from celery.exceptions import SecurityWarning

    if hasattr(os, "geteuid") and os.geteuid() == 0:
        warnings.simplefilter("ignore", SecurityWarning)
    sys.argv = ["celery", *sys.argv[1:]]
    celery_main()


if __name__ == "__main__":
    main()
