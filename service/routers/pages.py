"""Browser pages: the jobs list and an attribution's results, with training inputs drawn beside each query.

The pages are static shells: they ask for the API key once, keep it in the tab's sessionStorage and call the
JSON API with an ``Authorization`` header, so the key never appears in a URL or a server log.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from service.problems import not_found

router = APIRouter(prefix="/ui", include_in_schema=False)

ASSETS = {
    "style.css": "text/css",
    "common.js": "text/javascript",
    "results.js": "text/javascript",
    "jobs.js": "text/javascript",
}


def ui_file(name: str) -> Path:
    return Path(str(files("service.ui") / name))


# Scripts and styles only from this server, no inline script: text from datasets can never run as code.
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:",
    "Referrer-Policy": "no-referrer",
}


def page(name: str) -> FileResponse:
    return FileResponse(ui_file(name), media_type="text/html", headers=PAGE_HEADERS)


@router.get("")
def home() -> RedirectResponse:
    return RedirectResponse("/ui/jobs")


@router.get("/jobs")
def jobs_page() -> FileResponse:
    return page("jobs.html")


@router.get("/attributions/{attribution_id}")
def results_page(attribution_id: str) -> FileResponse:
    return page("results.html")


@router.get("/assets/{name}")
def asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise not_found("asset", name)
    return FileResponse(ui_file(name), media_type=ASSETS[name])
