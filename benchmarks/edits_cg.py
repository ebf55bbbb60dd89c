"""How the Newton edit's CG solve converges on the digits models of benchmarks/edits_retraining.py.

For the top-10/40/100 helpful sets of two queries and the top-100 self-influence and random-100 sets, solve
(G_{−S}(θ₀) + λI) d = r (λ the mean Gauss-Newton eigenvalue) by CG, plain and with a Jacobi preconditioner
(the diagonal Fisher from per-example squared gradients, + λ), for 40 iterations, and report after k iterations:
the relative residual, the distance to the 40-iteration plain solution (relative), the change of the set's
query loss (own query; self/random sets: the mean over the first 6 queries) and the test accuracy at θ₀ + d
(the untrimmed step: no trust radius, no line search).

    python -m benchmarks.edits_cg --only mlp      # results/edits_cg_mlp.md (and --only cnn)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch

from benchmarks.common import RESULTS, digits_split, set_threads
from benchmarks.edits_retraining import Setting, accuracy, load, losses, removal_sets, train
from worker.attribution import Examples, InfluenceOptions, fit_curvature
from worker.attribution.curvature.diagonal import DiagonalCurvature
from worker.attribution.hooks import evaluation_mode, resolve_layers
from worker.attribution.proximal import Flat, ProximalObjective, mean_curvature_eigenvalue, state_entries

CHECKPOINTS = (2, 4, 6, 8, 10, 15, 20, 40)


def pcg(
    matvec: Callable[[Flat], Flat], rhs: Flat, precondition: Callable[[Flat], Flat]
) -> dict[int, tuple[Flat, float]]:
    x, residual = torch.zeros_like(rhs), rhs.clone()
    z = precondition(residual)
    direction, rz, norm0, out = z.clone(), float(residual @ z), float(rhs.norm()), {}
    for iteration in range(1, max(CHECKPOINTS) + 1):
        product = matvec(direction)
        alpha = rz / float(direction @ product)
        x, residual = x + alpha * direction, residual - alpha * product
        if iteration in CHECKPOINTS:
            out[iteration] = (x.clone(), float(residual.norm()) / norm0)
        z = precondition(residual)
        rz_next = float(residual @ z)
        direction, rz = z + (rz_next / rz) * direction, rz_next
    return out


def run(arch: str) -> list[str]:
    setting = {"mlp": Setting("mlp", 6, 1, 300), "cnn": Setting("cnn", 3, 1, 150)}[arch]
    train_data, test = digits_split(num_queries=397)
    queries = Examples(test.inputs[: setting.queries], test.targets[: setting.queries])
    base = train(arch, train_data, torch.arange(len(train_data)), 0, setting)
    fit = fit_curvature(base, train_data, "cross_entropy", InfluenceOptions(strategy="ekfac").fit_options())
    layers = resolve_layers(base, None)
    proximity = mean_curvature_eigenvalue(base, layers, train_data, "cross_entropy", 1024)
    diagonal_fit = fit_curvature(base, train_data, "cross_entropy", InfluenceOptions(strategy="diagonal").fit_options())
    assert isinstance(diagonal_fit, DiagonalCurvature)
    diagonal = torch.cat([diagonal_fit.diagonals[layer.name].reshape(-1) for layer in layers]).float()
    state, base_losses = base.state_dict(), losses(base, test)
    lines = [
        f"### {arch.upper()} (λ = mean GN eigenvalue = {proximity:.3g}; untrimmed CG steps)",
        "",
        "| set | CG | " + " | ".join(f"k={k}: residual / error / Δloss / acc." for k in CHECKPOINTS) + " |",
        "| --- | --- | " + " | ".join("---" for _ in CHECKPOINTS) + " |",
    ]
    for removal in removal_sets(arch, base, train_data, queries, fit, seed=1):
        if removal.query not in (0, 1) and not (removal.query is None and "100" in removal.group):
            continue
        with evaluation_mode(base):
            objective = ProximalObjective(base, layers, train_data, removal.rows, "cross_entropy", 2048)
            operator = objective.curvature_operator(objective.theta0)

            def matvec(v: Flat, operator: Callable[[Flat], Flat] = operator) -> Flat:
                return operator(v) + proximity * v

            solves = {
                "plain": pcg(matvec, objective.removal_gradient, lambda r: r),
                "Jacobi": pcg(matvec, objective.removal_gradient, lambda r: r / (diagonal + proximity)),
            }
        reference = solves["plain"][max(CHECKPOINTS)][0]
        for name, solve in solves.items():
            cells = []
            for k in CHECKPOINTS:
                step, residual = solve[k]
                edited = load(
                    arch,
                    {**state, **{key: v.detach() for key, v in state_entries(layers, objective.theta0 + step).items()}},
                )
                change = losses(edited, test) - base_losses
                own = float(change[removal.query]) if removal.query is not None else float(change[:6].mean())
                error = float((step - reference).norm() / reference.norm())
                cells.append(f"{residual:.2f} / {error:.2f} / {own:.3f} / {accuracy(edited, test):.3f}")
            query = f" (query {removal.query})" if removal.query is not None else ""
            lines.append(f"| {removal.group}{query} | {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["mlp", "cnn"], required=True)
    args = parser.parse_args()
    set_threads(1)
    lines = [
        "# CG convergence of the Newton edit (digits)",
        "",
        f"Command: `python -m benchmarks.edits_cg {' '.join(sys.argv[1:])}`; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}, 1 thread, CPU.",
        "",
        "Cells: relative residual / distance to the 40-iteration plain solution (relative) / change of the set's query "
        "loss / test accuracy of θ₀ + d.",
        "",
        *run(args.only),
    ]
    (RESULTS / f"edits_cg_{args.only}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
