"""The asynchronous client: ``from attrib import AsyncClient``; the same methods as :class:`attrib.Client`,
awaited (iterators are async iterators)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from attrib import calls
from attrib.client import DEFAULT_TIMEOUT, read_parquet, to_pandas
from attrib.config import resolve_api_key, resolve_base_url
from attrib.jobs import AsyncJob
from attrib.options import Edit, MethodOptions
from attrib.resources import Attribution, Checkpoint, Dataset, Fit, JobState, Model, ResultRow
from attrib.transport import Call, RetryPolicy, send_async, stream_async


class AsyncClient:
    """The async twin of :class:`attrib.Client` (same configuration, retries and errors).

    >>> async with AsyncClient() as client:
    ...     attribution = await client.attribute(model_id, train_id, query_id, top_k=10)
    ...     await attribution.job.wait()
    ...     async for row in client.results(attribution):
    ...         print(row)
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = resolve_base_url(base_url)
        self.retry = retry or RetryPolicy()
        self.http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=timeout,
            transport=transport,
            headers={"Authorization": f"Bearer {resolve_api_key(api_key)}"},
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def call(self, call: Call) -> Any:
        response = await send_async(self.http, call, self.retry)
        return response.json() if response.content else None

    async def pages(self, path: str, key: str, params: dict[str, Any] | None = None) -> AsyncIterator[dict[str, Any]]:
        token = None
        while True:
            body = await self.call(Call("GET", path, params={**(params or {}), "page_token": token}))
            for item in body[key]:
                yield item
            token = body.get("next_page_token")
            if not token:
                return

    # --- models ------------------------------------------------------------------------------------------

    async def upload_model(
        self,
        weights: Any = None,
        *,
        name: str,
        architecture: Any = None,
        loss: str | None = None,
        format: str = "spec",
        task: dict[str, Any] | None = None,
        config: Any = None,
        weights_index: Any = None,
        tokenizer: Any = None,
        tokenizer_config: Any = None,
        archive: Any = None,
        base_model: Any = None,
        adapter_config: Any = None,
    ) -> Model:
        """See :meth:`attrib.Client.upload_model`."""
        return Model.from_json(
            await self.call(
                calls.upload_model(
                    weights,
                    name=name,
                    format=format,
                    architecture=architecture,
                    loss=loss,
                    task=task,
                    config=config,
                    weights_index=weights_index,
                    tokenizer=tokenizer,
                    tokenizer_config=tokenizer_config,
                    archive=archive,
                    base_model=base_model,
                    adapter_config=adapter_config,
                )
            )
        )

    async def upload_checkpoint(
        self, model: Any, weights: Any, *, step: int, learning_rate: float, stage: int = 0, momentum: float = 0.0
    ) -> Checkpoint:
        return Checkpoint.from_json(
            await self.call(
                calls.upload_checkpoint(
                    model, weights, step=step, learning_rate=learning_rate, stage=stage, momentum=momentum
                )
            )
        )

    async def get_model(self, model_id: str) -> Model:
        return Model.from_json(await self.call(Call("GET", f"/v1/models/{calls.ident(model_id)}")))

    async def list_models(self) -> AsyncIterator[Model]:
        async for item in self.pages("/v1/models", "models"):
            yield Model.from_json(item)

    async def delete_model(self, model: Any) -> None:
        await self.call(Call("DELETE", f"/v1/models/{calls.ident(model)}"))

    async def download_weights(self, model: Any, path: str | Path) -> Path:
        return await self._download(Call("GET", f"/v1/models/{calls.ident(model)}/weights"), Path(path))

    # --- datasets ----------------------------------------------------------------------------------------

    async def upload_dataset(
        self,
        data: Any = None,
        *,
        name: str,
        inputs: Any = None,
        targets: Any = None,
        ids: Any = None,
        weight: Any = None,
        task: Any = None,
        split: Any = None,
        metadata: dict[str, Any] | None = None,
    ) -> Dataset:
        """See :meth:`attrib.Client.upload_dataset`."""
        return Dataset.from_json(
            await self.call(
                calls.upload_dataset(
                    data,
                    name=name,
                    extra_metadata=metadata,
                    inputs=inputs,
                    targets=targets,
                    ids=ids,
                    weight=weight,
                    task=task,
                    split=split,
                )
            )
        )

    async def get_dataset(self, dataset_id: str) -> Dataset:
        return Dataset.from_json(await self.call(Call("GET", f"/v1/datasets/{calls.ident(dataset_id)}")))

    async def list_datasets(self) -> AsyncIterator[Dataset]:
        async for item in self.pages("/v1/datasets", "datasets"):
            yield Dataset.from_json(item)

    async def delete_dataset(self, dataset: Any) -> None:
        await self.call(Call("DELETE", f"/v1/datasets/{calls.ident(dataset)}"))

    async def examples(self, dataset: Any, ids: list[Any]) -> list[dict[str, Any]]:
        return list((await self.call(calls.examples(dataset, ids)))["examples"])

    # --- jobs --------------------------------------------------------------------------------------------

    def job(self, job_id: str) -> AsyncJob:
        return AsyncJob(self, calls.ident(job_id))

    async def get_job(self, job_id: str) -> JobState:
        return JobState.from_json(await self.call(Call("GET", f"/v1/jobs/{calls.ident(job_id)}")))

    async def cancel_job(self, job_id: str) -> JobState:
        return JobState.from_json(await self.call(Call("POST", f"/v1/jobs/{calls.ident(job_id)}/cancel")))

    async def list_jobs(self, status: str | None = None) -> AsyncIterator[JobState]:
        async for item in self.pages("/v1/jobs", "jobs", {"status": status}):
            yield JobState.from_json(item)

    # --- fits and attributions ---------------------------------------------------------------------------

    async def fit(
        self, model: Any, dataset: Any, *, strategy: str = "ekfac", damping: float | None = None, **options: Any
    ) -> Fit:
        body = await self.call(calls.fit(model, dataset, strategy=strategy, damping=damping, options=options))
        return Fit.from_json(body, AsyncJob(self, body["job_id"]))

    async def attribute(
        self,
        model: Any,
        train: Any,
        queries: Any = None,
        *,
        method: str | None = None,
        mode: str = "pairwise",
        measurement: str = "loss",
        top_k: int = 10,
        fit: Any = None,
        options: MethodOptions | dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Attribution:
        """See :meth:`attrib.Client.attribute`; ``await attribution.job.wait()`` follows the job."""
        body = await self.call(
            calls.attribute(
                model,
                train,
                queries,
                method=method,
                mode=mode,
                measurement=measurement,
                top_k=top_k,
                fit=fit,
                options=options,
                extra=extra,
            )
        )
        return Attribution.from_json(body, AsyncJob(self, body["job_id"]))

    async def get_attribution(self, attribution_id: str) -> Attribution:
        body = await self.call(Call("GET", f"/v1/attributions/{calls.ident(attribution_id)}"))
        return Attribution.from_json(body, AsyncJob(self, body["job_id"]))

    # --- results -----------------------------------------------------------------------------------------

    async def results(
        self,
        attribution: Any,
        *,
        query_id: Any = None,
        direction: str = "positive",
        page_size: int = 1000,
        query_token: int | None = None,
    ) -> AsyncIterator[ResultRow]:
        token = None
        while True:
            body = await self.call(
                calls.results_page(
                    attribution,
                    query_id=query_id,
                    direction=direction,
                    page_size=page_size,
                    page_token=token,
                    query_token=query_token,
                )
            )
            for row in body["results"]:
                yield ResultRow.from_json(row)
            token = body.get("next_page_token")
            if not token:
                return

    async def export(self, attribution: Any, path: str | Path, *, format: str | None = None) -> Path:
        path = Path(path)
        return await self._download(calls.export(attribution, calls.export_format(path, format)), path)

    async def results_table(self, attribution: Any) -> Any:
        response = await send_async(self.http, calls.export(attribution, "parquet"), self.retry)
        return read_parquet(response.content)

    async def results_dataframe(self, attribution: Any) -> Any:
        return to_pandas(await self.results_table(attribution))

    def results_page_url(self, attribution: Any) -> str:
        return f"{self.base_url}/ui/attributions/{calls.ident(attribution)}"

    # --- editing -----------------------------------------------------------------------------------------

    async def edit(
        self,
        attribution: Any,
        remove: list[Any],
        *,
        name: str,
        options: Edit | dict[str, Any] | None = None,
        progress: bool = True,
    ) -> Model:
        """See :meth:`attrib.Client.edit`."""
        body = await self.call(calls.edit(attribution, remove, name, options))
        await AsyncJob(self, body["job_id"]).wait(progress=progress)
        return await self.get_model(body["model_id"])

    async def _download(self, call: Call, path: Path) -> Path:
        partial = path.with_name(path.name + ".part")
        async with stream_async(self.http, call, self.retry) as response:
            with open(partial, "wb") as out:
                async for chunk in response.aiter_bytes():
                    out.write(chunk)
        partial.replace(path)
        return path
