"""The synchronous client: ``from attrib import Client``."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from attrib import calls
from attrib.config import resolve_api_key, resolve_base_url
from attrib.jobs import Job
from attrib.options import Edit, MethodOptions
from attrib.resources import Attribution, Checkpoint, Dataset, Fit, JobState, Model, ResultRow
from attrib.transport import Call, RetryPolicy, send, stream

DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)


def read_parquet(data: bytes) -> Any:
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(data))


def to_pandas(table: Any) -> Any:
    try:
        import pandas  # noqa: F401
    except ImportError as exc:
        raise ImportError("results as a DataFrame need pandas: pip install pandas") from exc
    return table.to_pandas()


class Client:
    """A client of the attrib API.

    The base URL comes from ``base_url``, else ``ATTRIB_URL``, else ``http://127.0.0.1:8000``; the key from
    ``api_key``, else ``ATTRIB_API_KEY``, else ``$ATTRIB_DATA_DIR/api-key`` (the file ``attrib serve`` writes).
    Failed connections and 503s are retried with backoff; a retried POST reuses its Idempotency-Key, so it is
    never created twice. Errors are raised as :class:`attrib.ApiError` subclasses.

    >>> from attrib import Client
    >>> with Client() as client:
    ...     model = client.upload_model(net, name="mlp", architecture=layers, loss="cross_entropy")
    ...     train = client.upload_dataset(name="train", inputs=x_train, targets=y_train)
    ...     queries = client.upload_dataset(name="queries", inputs=x_test, targets=y_test)
    ...     attribution = client.attribute(model, train, queries, top_k=10)
    ...     attribution.job.wait()
    ...     frame = client.results_dataframe(attribution)
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = resolve_base_url(base_url)
        self.retry = retry or RetryPolicy()
        self.http = httpx.Client(
            base_url=self.base_url,
            timeout=timeout,
            transport=transport,
            headers={"Authorization": f"Bearer {resolve_api_key(api_key)}"},
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def call(self, call: Call) -> Any:
        """Send a call and return its JSON body (None for an empty body)."""
        response = send(self.http, call, self.retry)
        return response.json() if response.content else None

    def pages(self, path: str, key: str, params: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Every item of a paginated list, following ``next_page_token``."""
        token = None
        while True:
            body = self.call(Call("GET", path, params={**(params or {}), "page_token": token}))
            yield from body[key]
            token = body.get("next_page_token")
            if not token:
                return

    # --- models ------------------------------------------------------------------------------------------

    def upload_model(
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
        """Upload a model.

        ``weights``: a safetensors file path, safetensors bytes, a torch module or a ``state_dict`` (a list of
        these for sharded ``hf`` weights). ``format="spec"`` (the default) needs ``architecture``: a dict
        ``{"type": "sequential", "layers": [...]}`` or just the list of layers; ``loss`` is
        ``"cross_entropy"``, ``"mse"`` or ``"causal_lm"``. ``format="hf"`` takes ``config``,
        ``weights_index``, ``tokenizer``, ``tokenizer_config`` (paths, bytes or dicts) or one ``archive``;
        ``format="lora"`` takes ``base_model`` (a stored ``hf`` model or its id), ``adapter_config`` and the
        adapter's ``weights`` (adapter_model.safetensors), or one ``archive`` of the adapter folder.

        >>> layers = [{"type": "linear", "in_features": 64, "out_features": 10}]
        >>> model = client.upload_model(torch.nn.Sequential(torch.nn.Linear(64, 10)), name="linear",
        ...                             architecture=layers, loss="cross_entropy")
        >>> model.tracked_layers
        ['0']
        """
        return Model.from_json(
            self.call(
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

    def upload_checkpoint(
        self, model: Any, weights: Any, *, step: int, learning_rate: float, stage: int = 0, momentum: float = 0.0
    ) -> Checkpoint:
        """Upload one checkpoint of the model's training trajectory (for SOURCE and TracInCP).

        >>> client.upload_checkpoint(model, "epoch-3.safetensors", step=300, learning_rate=0.1)
        """
        return Checkpoint.from_json(
            self.call(
                calls.upload_checkpoint(
                    model, weights, step=step, learning_rate=learning_rate, stage=stage, momentum=momentum
                )
            )
        )

    def get_model(self, model_id: str) -> Model:
        return Model.from_json(self.call(Call("GET", f"/v1/models/{calls.ident(model_id)}")))

    def list_models(self) -> Iterator[Model]:
        return (Model.from_json(item) for item in self.pages("/v1/models", "models"))

    def delete_model(self, model: Any) -> None:
        self.call(Call("DELETE", f"/v1/models/{calls.ident(model)}"))

    def download_weights(self, model: Any, path: str | Path) -> Path:
        """Save the model's weights (safetensors) to ``path``; returns the path.

        >>> client.download_weights(edited, "cleaned.safetensors")
        """
        return self._download(Call("GET", f"/v1/models/{calls.ident(model)}/weights"), Path(path))

    # --- datasets ----------------------------------------------------------------------------------------

    def upload_dataset(
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
        """Upload a dataset.

        Either ``data``: a file (safetensors, ``.npz`` or Parquet), a pandas DataFrame or pyarrow Table (sent
        as Parquet: an ``inputs`` list column, or numeric feature columns, plus ``targets`` and ``ids``), or a
        mapping of field → array; or the fields as keywords, each a numpy array, torch tensor or list.

        >>> train = client.upload_dataset(name="train", inputs=x_train, targets=y_train, ids=train_ids)
        >>> table = client.upload_dataset(frame, name="tabular")   # a pandas DataFrame
        """
        return Dataset.from_json(
            self.call(
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

    def get_dataset(self, dataset_id: str) -> Dataset:
        return Dataset.from_json(self.call(Call("GET", f"/v1/datasets/{calls.ident(dataset_id)}")))

    def list_datasets(self) -> Iterator[Dataset]:
        return (Dataset.from_json(item) for item in self.pages("/v1/datasets", "datasets"))

    def delete_dataset(self, dataset: Any) -> None:
        self.call(Call("DELETE", f"/v1/datasets/{calls.ident(dataset)}"))

    def examples(self, dataset: Any, ids: list[Any]) -> list[dict[str, Any]]:
        """Some examples of a dataset by their ids (at most 100): ``[{"id", "input", "target"}, ...]``."""
        return list(self.call(calls.examples(dataset, ids))["examples"])

    # --- jobs --------------------------------------------------------------------------------------------

    def job(self, job_id: str) -> Job:
        """A handle on a job: ``client.job("job_…").wait()``."""
        return Job(self, calls.ident(job_id))

    def get_job(self, job_id: str) -> JobState:
        return JobState.from_json(self.call(Call("GET", f"/v1/jobs/{calls.ident(job_id)}")))

    def cancel_job(self, job_id: str) -> JobState:
        return JobState.from_json(self.call(Call("POST", f"/v1/jobs/{calls.ident(job_id)}/cancel")))

    def list_jobs(self, status: str | None = None) -> Iterator[JobState]:
        return (JobState.from_json(item) for item in self.pages("/v1/jobs", "jobs", {"status": status}))

    # --- fits and attributions ---------------------------------------------------------------------------

    def fit(
        self, model: Any, dataset: Any, *, strategy: str = "ekfac", damping: float | None = None, **options: Any
    ) -> Fit:
        """Queue a reusable curvature fit; ``fit.job.wait()`` follows it. Pass it to ``attribute(fit=...)``."""
        body = self.call(calls.fit(model, dataset, strategy=strategy, damping=damping, options=options))
        return Fit.from_json(body, Job(self, body["job_id"]))

    def attribute(
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
        """Queue an attribution: which training examples of ``train`` help or hurt each query.

        ``model`` is a model (or a list of models: an ensemble), ``train`` / ``queries`` datasets (records or
        ids; ``queries`` is omitted in ``mode="self"``). ``options`` is a typed options object such as
        :class:`attrib.options.Influence` (which names the method) or a dict for ``method``. Returns at once;
        ``attribution.job.wait()`` follows the job.

        >>> from attrib.options import Influence
        >>> attribution = client.attribute(model, train, queries, top_k=20, measurement="margin",
        ...                                options=Influence(strategy="ekfac"))
        >>> attribution.job.wait()
        """
        body = self.call(
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
        return Attribution.from_json(body, Job(self, body["job_id"]))

    def get_attribution(self, attribution_id: str) -> Attribution:
        body = self.call(Call("GET", f"/v1/attributions/{calls.ident(attribution_id)}"))
        return Attribution.from_json(body, Job(self, body["job_id"]))

    # --- results -----------------------------------------------------------------------------------------

    def results(
        self,
        attribution: Any,
        *,
        query_id: Any = None,
        direction: str = "positive",
        page_size: int = 1000,
        query_token: int | None = None,
    ) -> Iterator[ResultRow]:
        """Ranked rows of one direction, across pages, ordered by query then rank.

        >>> for row in client.results(attribution, query_id=7, direction="negative"):
        ...     print(row.rank, row.train_id, row.score)
        """
        token = None
        while True:
            body = self.call(
                calls.results_page(
                    attribution,
                    query_id=query_id,
                    direction=direction,
                    page_size=page_size,
                    page_token=token,
                    query_token=query_token,
                )
            )
            yield from (ResultRow.from_json(row) for row in body["results"])
            token = body.get("next_page_token")
            if not token:
                return

    def export(self, attribution: Any, path: str | Path, *, format: str | None = None) -> Path:
        """Save every result row to a file (``csv``, ``parquet`` or ``ndjson``; default from the suffix).

        >>> client.export(attribution, "rows.parquet")
        """
        path = Path(path)
        return self._download(calls.export(attribution, calls.export_format(path, format)), path)

    def results_table(self, attribution: Any) -> Any:
        """Every result row as a pyarrow Table (query_id, direction, rank, train_id, score, …)."""
        return read_parquet(send(self.http, calls.export(attribution, "parquet"), self.retry).content)

    def results_dataframe(self, attribution: Any) -> Any:
        """Every result row as a pandas DataFrame (needs pandas)."""
        return to_pandas(self.results_table(attribution))

    def results_page_url(self, attribution: Any) -> str:
        """The results page in a browser (it asks for the API key once; the key never goes in the URL)."""
        return f"{self.base_url}/ui/attributions/{calls.ident(attribution)}"

    # --- editing -----------------------------------------------------------------------------------------

    def edit(
        self,
        attribution: Any,
        remove: list[Any],
        *,
        name: str,
        options: Edit | dict[str, Any] | None = None,
        progress: bool = True,
    ) -> Model:
        """A new model estimating the model retrained without ``remove`` (training ids, or task ids).

        The server computes it as a job; this waits for it and returns the new model. ``options``: how the
        retrain is estimated (:class:`attrib.options.Edit` or a dict; only the ones set are sent). The new
        model's ``raw["edit_diagnostics"]`` say what the edit did.

        >>> negative = [row.train_id for row in client.results(attribution, direction="negative")][:20]
        >>> cleaned = client.edit(attribution, negative, name="mlp-cleaned")
        >>> client.download_weights(cleaned, "cleaned.safetensors")
        >>> from attrib.options import Edit
        >>> lighter = client.edit(attribution, negative, name="mlp-l2", options=Edit(proximity=1e-3))
        """
        body = self.call(calls.edit(attribution, remove, name, options))
        Job(self, body["job_id"]).wait(progress=progress)
        return self.get_model(body["model_id"])

    # --- helpers -----------------------------------------------------------------------------------------

    def _download(self, call: Call, path: Path) -> Path:
        partial = path.with_name(path.name + ".part")
        with stream(self.http, call, self.retry) as response, open(partial, "wb") as out:
            for chunk in response.iter_bytes():
                out.write(chunk)
        partial.replace(path)
        return path
