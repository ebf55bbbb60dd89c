"""How the Newton edit's CG solve converges on the digits models of benchmarks/edits_retraining.py.

For the top-10/40/100 helpful sets of two queries and the top-100 self-influence and random-100 sets, solve
(G_{−S}(θ₀) + λI) d = r (λ the edit's default: 0.5 × trace(G)/D, computed) by CG: plain, with a Jacobi
preconditioner (the diagonal Fisher from per-example squared gradients, + λ) and with the edit's Kronecker
preconditioner (``options.preconditioner``, worker/attribution/edit_preconditioner.py), for 40 iterations, and
report after k iterations: the relative residual, the distance to the converged solution (relative; 300
preconditioned iterations), the change of the set's query loss (own query; self/random sets: the mean over the
first 6 queries) and the test accuracy at θ₀ + d (the untrimmed step: no trust radius, no line search).

    python -m benchmarks.edits_cg --only mlp --tag kronecker   # results/edits_cg_mlp_kronecker.md (and --only cnn)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch

from benchmarks.common import RESULTS, digits_split, set_threads
from benchmarks.edits_retraining import EPOCHS, Setting, accuracy, load, losses, removal_sets, train
from worker.attribution import Examples, InfluenceOptions, fit_curvature
from worker.attribution.curvature.diagonal import DiagonalCurvature
from worker.attribution.edit_preconditioner import KroneckerPreconditioner
from worker.attribution.hooks import evaluation_mode, resolve_layers
from worker.attribution.options import DEFAULT_PROXIMITY_FRACTION
from worker.attribution.proximal import Flat, ProximalObjective, conjugate_gradient, state_entries

CHECKPOINTS = (2, 4, 6, 8, 10, 15, 20, 40)
CONVERGED_ITERATIONS = 300


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
    setting = Setting(arch, queries={"mlp": 6, "cnn": 3}[arch], seeds=1, epochs=EPOCHS[arch])
    train_data, test = digits_split(num_queries=397)
    queries = Examples(test.inputs[: setting.queries], test.targets[: setting.queries])
    base = train(arch, train_data, torch.arange(len(train_data)), 0, setting)
    fit = fit_curvature(base, train_data, "cross_entropy", InfluenceOptions(strategy="ekfac").fit_options())
    layers = resolve_layers(base, None)
    nothing = torch.zeros(0, dtype=torch.long)
    whole = ProximalObjective(base, layers, train_data, nothing, "cross_entropy", 1024, linearised=False)
    computed = whole.mean_eigenvalue()
    assert computed is not None
    proximity = DEFAULT_PROXIMITY_FRACTION * computed[0]
    diagonal_fit = fit_curvature(base, train_data, "cross_entropy", InfluenceOptions(strategy="diagonal").fit_options())
    assert isinstance(diagonal_fit, DiagonalCurvature)
    diagonal = torch.cat([diagonal_fit.diagonals[layer.name].reshape(-1) for layer in layers]).float()
    state, base_losses = base.state_dict(), losses(base, test)
    lines = [
        f"### {arch.upper()} (λ = {DEFAULT_PROXIMITY_FRACTION:g} × trace(G)/D = {proximity:.3g}; untrimmed CG steps)",
        "",
        "| set | CG | " + " | ".join(f"k={k}: residual / error / Δloss / acc." for k in CHECKPOINTS) + " |",
        "| --- | --- | " + " | ".join("---" for _ in CHECKPOINTS) + " |",
    ]
    for removal in removal_sets(arch, base, train_data, queries, fit, seed=1):
        if removal.query not in (0, 1) and not (removal.query is None and "100" in removal.group):
            continue
        with evaluation_mode(base):
            objective = ProximalObjective(
                base,
                layers,
                train_data,
                removal.rows,
                "cross_entropy",
                2048,
                curvature_products="auto",
                curvature_tol=1e-4,
                preconditioner_kind="kronecker",
            )
            operator = objective.curvature_operator(objective.theta0)
            fitted = objective.preconditioner
            assert fitted is not None

            def matvec(v: Flat, operator: Callable[[Flat], Flat] = operator) -> Flat:
                return operator(v) + proximity * v

            def kronecker(v: Flat, fitted: KroneckerPreconditioner = fitted) -> Flat:
                return fitted.apply(v, proximity)

            solves = {
                "plain": pcg(matvec, objective.removal_gradient, lambda r: r),
                "Jacobi": pcg(matvec, objective.removal_gradient, lambda r: r / (diagonal + proximity)),
                "Kronecker": pcg(matvec, objective.removal_gradient, kronecker),
            }
            reference = conjugate_gradient(
                matvec, objective.removal_gradient, 1e-9, CONVERGED_ITERATIONS, kronecker
            ).solution
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
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    args = parser.parse_args()
    set_threads(1)
    lines = [
        "# CG convergence of the Newton edit (digits)",
        "",
        f"Command: `python -m benchmarks.edits_cg {' '.join(sys.argv[1:])}`; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}, 1 thread, CPU.",
        "",
        "Cells: relative residual / distance to the converged solution (relative) / change of the set's query "
        "loss / test accuracy of θ₀ + d.",
        "",
        *run(args.only),
    ]
    suffix = f"_{args.tag}" if args.tag else ""
    (RESULTS / f"edits_cg_{args.only}{suffix}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
