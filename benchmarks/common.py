"""Shared helpers of the benchmarks (not part of the test suite).

Run from the repository root with the benchmark venv (see benchmarks/README.md):
    benchmarks/.venv-kron/bin/python -m benchmarks.lds_digits
Only the engine's public API (``worker.attribution``) is used; kronfluence is used only through
``KronfluenceRunner`` and only exists in benchmarks/.venv-kron.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch import nn

from worker.attribution import Examples

RESULTS = Path(__file__).resolve().parent / "results"
THREADS = 2


def set_threads(n: int = THREADS) -> None:
    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # already set
        torch.set_num_interop_threads(1)


# ---------------------------------------------------------------- data


def digits_split(num_queries: int = 100, seed: int = 0) -> tuple[Examples, Examples]:
    """scikit-learn's digits (1,797 8x8 images, shipped with the package), standardised per pixel on the
    training part; ``num_queries`` held-out examples (stratified random) are the queries."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = data.data.astype(np.float32)
    y = data.target.astype(np.int64)
    x_train, x_query, y_train, y_query = train_test_split(x, y, test_size=num_queries, random_state=seed, stratify=y)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6  # constant pixels stay 0
    x_train, x_query = (x_train - mean) / std, (x_query - mean) / std
    return (
        Examples(torch.from_numpy(x_train), torch.from_numpy(y_train)),
        Examples(torch.from_numpy(x_query), torch.from_numpy(y_query)),
    )


def teacher_data(num_train: int = 5000, num_queries: int = 100, dim: int = 64, classes: int = 10, seed: int = 0):
    """Synthetic: x ~ N(0, I_dim); label = argmax of a random teacher MLP dim->128->classes (tanh) plus
    Gumbel noise of scale 0.5 (so labels are not a deterministic function of x: a few are 'noisy')."""
    g = torch.Generator().manual_seed(seed)
    n = num_train + num_queries
    x = torch.randn(n, dim, generator=g)
    w1 = torch.randn(dim, 128, generator=g) / dim**0.5
    w2 = torch.randn(128, classes, generator=g) * 3 / 128**0.5
    logits = torch.tanh(x @ w1) @ w2
    gumbel = -torch.log(-torch.log(torch.rand(n, classes, generator=g).clamp_min(1e-12)))
    y = (logits + 0.5 * gumbel).argmax(1)
    return Examples(x[:num_train], y[:num_train]), Examples(x[num_train:], y[num_train:])


# ---------------------------------------------------------------- MLPs, trained in a batch


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@dataclass
class Recipe:
    """How a model is trained (the same recipe for the attributed models and for the LDS retraining).

    Adam on the mean cross-entropy + (weight_decay / 2) ||theta||^2 (coupled L2, weights and biases);
    ``batch_size`` None = full batch (then the seed only picks the initialisation)."""

    hidden: tuple[int, ...] = (32,)
    epochs: int = 300
    lr: float = 0.01
    weight_decay: float = 1e-3
    batch_size: int | None = None

    def describe(self) -> str:
        batch = "full batch" if self.batch_size is None else f"batch {self.batch_size}"
        return (
            f"MLP {'->'.join(map(str, (64, *self.hidden, 10)))} (ReLU), Adam lr {self.lr}, {self.epochs} epochs, "
            f"{batch}, L2 {self.weight_decay}"
        )


def _init(sizes: list[int], seeds: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """nn.Linear's default initialisation (U(-1/sqrt(fan_in), 1/sqrt(fan_in))), one generator per model."""
    params = []
    for i in range(len(sizes) - 1):
        ws, bs = [], []
        for seed in seeds:
            g = torch.Generator().manual_seed(seed * 1000 + i)
            bound = 1 / sizes[i] ** 0.5
            ws.append((torch.rand(sizes[i], sizes[i + 1], generator=g) * 2 - 1) * bound)
            bs.append((torch.rand(sizes[i + 1], generator=g) * 2 - 1) * bound)
        params.append((torch.stack(ws).requires_grad_(), torch.stack(bs).requires_grad_()))
    return params


def _forward(params: list[tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor) -> torch.Tensor:
    """x (M, B, d_in) -> logits (M, B, classes)."""
    h = x
    for i, (w, b) in enumerate(params):
        h = torch.baddbmm(b.unsqueeze(1), h, w)
        if i < len(params) - 1:
            h = torch.relu(h)
    return h


def train_many(
    x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, seeds: list[int], recipe: Recipe
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Trains M = len(seeds) MLPs at once, model m on rows ``index[m]`` of (x, y) with seed ``seeds[m]``.
    Equivalent to M separate trainings (parameters, Adam states and batches are per model)."""
    sizes = [x.shape[1], *recipe.hidden, int(y.max()) + 1]
    n = index.shape[1]
    params = _init(sizes, seeds)
    flat = [t for pair in params for t in pair]
    opt = torch.optim.Adam(flat, lr=recipe.lr)
    xs, ys = x[index], y[index]  # (M, n, d), (M, n)
    gens = [torch.Generator().manual_seed(10_000 + s) for s in seeds]
    batch = n if recipe.batch_size is None else recipe.batch_size
    for _ in range(recipe.epochs):
        if batch >= n:
            orders = [None]
        else:
            perm = torch.stack([torch.randperm(n, generator=g) for g in gens])  # (M, n)
            orders = [perm[:, s : s + batch] for s in range(0, n, batch)]
        for order in orders:
            if order is None:
                xb, yb = xs, ys
            else:
                xb = xs.gather(1, order.unsqueeze(-1).expand(-1, -1, xs.shape[2]))
                yb = ys.gather(1, order)
            logits = _forward(params, xb)
            # sum over models of each model's mean loss: each model gets its own gradient
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.reshape(-1), reduction="sum") / yb.shape[1]
            if recipe.weight_decay:
                loss = loss + 0.5 * recipe.weight_decay * sum(t.pow(2).sum() for t in flat)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return [(w.detach(), b.detach()) for w, b in params]


def margins_of(params: list[tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(M, Q) margins: logit of the true class - logsumexp of the other logits."""
    with torch.no_grad():
        logits = _forward(params, x.unsqueeze(0).expand(params[0][0].shape[0], -1, -1))
        true = logits.gather(2, y.view(1, -1, 1).expand(logits.shape[0], -1, 1)).squeeze(2)
        others = logits.scatter(2, y.view(1, -1, 1).expand(logits.shape[0], -1, 1), float("-inf"))
        return true - others.logsumexp(2)


def accuracy_of(params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = _forward(params, x.unsqueeze(0).expand(params[0][0].shape[0], -1, -1))
        return (logits.argmax(2) == y.view(1, -1)).float().mean(1)


def to_module(params: list[tuple[torch.Tensor, torch.Tensor]], m: int) -> nn.Sequential:
    """Model m of a batch as an nn.Sequential of Linear/ReLU."""
    sizes = [params[0][0].shape[1]] + [w.shape[2] for w, _ in params]
    model = mlp(sizes)
    linears = [layer for layer in model if isinstance(layer, nn.Linear)]
    with torch.no_grad():
        for layer, (w, b) in zip(linears, params, strict=True):
            layer.weight.copy_(w[m].T)
            layer.bias.copy_(b[m])
    return model.eval()


def train_models(train: Examples, seeds: list[int], recipe: Recipe) -> list[nn.Sequential]:
    index = torch.arange(len(train)).expand(len(seeds), -1)
    params = train_many(train.inputs, train.targets, index, seeds, recipe)
    return [to_module(params, m) for m in range(len(seeds))]


# ---------------------------------------------------------------- scores


def full_scores(result, num_train: int) -> torch.Tensor:
    """The (Q, N) score matrix from a pairwise result computed with top_k = N."""
    topk = result.topk
    assert topk.positive_indices.shape[1] == num_train, "pairwise must be called with top_k = N"
    out = torch.full((topk.positive_indices.shape[0], num_train), float("nan"))
    out.scatter_(1, topk.positive_indices, topk.positive_scores.float())
    assert not torch.isnan(out).any()
    return out


def rowwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of a[i] and b[i] for every row i (average ranks for ties)."""
    a, b = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, dtype=np.float64))
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    denom = np.sqrt((ra**2).sum(1) * (rb**2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ra * rb).sum(1) / denom


class Timer:
    """Wall time (time.perf_counter) and this process's CPU time (time.process_time, all threads)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.cpu_seconds = 0.0

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
        self.cpu_seconds = time.process_time() - self.cpu_start


# ---------------------------------------------------------------- kronfluence (benchmark venv only)


class KronfluenceRunner:
    """kronfluence 1.0.1 on an MLP classifier. Measurement "loss" or "margin" (f = -margin, as in
    kronfluence's own examples), so scores follow our sign convention (positive = helpful).

    Another model family passes its own kronfluence ``task`` and ``dataset`` (Examples -> a torch Dataset
    whose batches the task reads), e.g. benchmarks/hf_vs_kronfluence.py for a causal LM."""

    def __init__(
        self,
        model: nn.Module,
        measurement: str = "loss",
        workdir: str | None = None,
        task=None,
        dataset=None,
        copy_model: bool = True,
    ):
        import copy
        import logging

        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.task import Task

        logging.getLogger("kronfluence").setLevel(logging.ERROR)

        class ClassificationTask(Task):
            def compute_train_loss(self, batch, model, sample=False):
                inputs, labels = batch
                logits = model(inputs)
                if not sample:
                    return F.cross_entropy(logits, labels, reduction="sum")
                with torch.no_grad():
                    probs = torch.softmax(logits.detach(), dim=-1)
                    sampled = torch.multinomial(probs, num_samples=1).flatten()
                return F.cross_entropy(logits, sampled, reduction="sum")

            def compute_measurement(self, batch, model):
                inputs, labels = batch
                logits = model(inputs)
                if measurement == "loss":
                    return F.cross_entropy(logits, labels, reduction="sum")
                rows = torch.arange(logits.shape[0])
                true = logits[rows, labels]
                others = logits.clone()
                others[rows, labels] = float("-inf")
                return -(true - others.logsumexp(-1)).sum()

        self.task = ClassificationTask() if task is None else task
        if dataset is not None:
            self.dataset = dataset
        self.model = prepare_model((copy.deepcopy(model) if copy_model else model).eval(), self.task)
        self._tmp = tempfile.TemporaryDirectory(prefix="kron-") if workdir is None else None
        out = workdir if workdir is not None else self._tmp.name
        self.analyzer = Analyzer("bench", self.model, self.task, cpu=True, disable_tqdm=True, output_dir=out)
        from kronfluence.utils.dataset import DataLoaderKwargs

        self.analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0))

    @staticmethod
    def dataset(examples: Examples):  # replaced per instance by a ``dataset`` argument
        return torch.utils.data.TensorDataset(examples.inputs, examples.targets)

    def fit(self, train: Examples, strategy: str = "ekfac", empirical: bool = True, batch_size: int = 256) -> None:
        from kronfluence.arguments import FactorArguments

        args = FactorArguments(strategy=strategy, use_empirical_fisher=empirical)
        self.analyzer.fit_all_factors(
            "factors",
            self.dataset(train),
            per_device_batch_size=batch_size,
            factor_args=args,
            overwrite_output_dir=True,
        )

    def pairwise(
        self, train: Examples, queries: Examples, damping: float | None, batch_size: int = 256
    ) -> torch.Tensor:
        from kronfluence.arguments import ScoreArguments

        self.analyzer.compute_pairwise_scores(
            "pairwise",
            "factors",
            self.dataset(queries),
            self.dataset(train),
            per_device_query_batch_size=len(queries),
            per_device_train_batch_size=batch_size,
            score_args=ScoreArguments(damping_factor=damping),
            overwrite_output_dir=True,
        )
        return self.analyzer.load_pairwise_scores("pairwise")["all_modules"].float()

    def self_scores(self, train: Examples, damping: float | None, batch_size: int = 256) -> torch.Tensor:
        from kronfluence.arguments import ScoreArguments

        self.analyzer.compute_self_scores(
            "self",
            "factors",
            self.dataset(train),
            per_device_train_batch_size=batch_size,
            score_args=ScoreArguments(damping_factor=damping),
            overwrite_output_dir=True,
        )
        return self.analyzer.load_self_scores("self")["all_modules"].float()


# ---------------------------------------------------------------- reporting


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def environment() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=RESULTS.parent.parent
        ).stdout.strip()
    except OSError:
        commit = "?"
    return "\n".join(
        [
            f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
            f"- machine: {os.cpu_count()} CPU cores visible ({cpu}), torch threads {torch.get_num_threads()}; "
            "CPU shared with other work, so timings are noisy",
            f"- python {platform.python_version()}, torch {torch.__version__}, kronfluence {_version('kronfluence')}, "
            f"numpy {np.__version__}, scikit-learn {_version('scikit-learn')}, scipy {_version('scipy')}",
            f"- repository commit {commit} (engine files possibly uncommitted at run time)",
        ]
    )


def command_line() -> str:
    return (
        "benchmarks/.venv-kron/bin/python -m "
        + Path(sys.argv[0]).with_suffix("").name.join(["benchmarks.", ""])
        + ("" if len(sys.argv) == 1 else " " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    )


def write_result(name: str, title: str, body: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = f"# {title}\n\nCommand (from the repository root):\n\n    {command_line()}\n\n{environment()}\n\n{body}\n"
    path = RESULTS / f"{name}.md"
    path.write_text(text)
    print(text)
    return path


def write_keeping_earlier_runs(path: Path, text: str) -> None:
    """Write a run's results at the top of ``path`` and keep the file's earlier runs below them (figures quoted in
    the README and the notes point at runs that a later one would otherwise overwrite)."""
    earlier = path.read_text() if path.exists() else ""
    _, _, earlier_body = earlier.partition("\n")  # its title line is the new text's own
    kept = (
        f"\n\n## Earlier runs (the file before this run)\n{earlier_body.rstrip()}\n" if earlier_body.strip() else "\n"
    )
    path.write_text(text.rstrip("\n") + kept)
