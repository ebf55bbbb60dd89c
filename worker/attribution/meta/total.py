"""Total gradients g_i = D_λ f_i and total Hessian-vector products of f_i(λ) = L_O(λ, θ_i(λ); D_i^val).

One ``TaskTerm`` per task. Every term provides θ'v and θ'ᵀx (θ' = dθ_i/dλ); the total gradient, the
drop-third-order product Jᵀ∇²L_O J (J = [I; θ']) and validation-instance scores are built from them.
``ImplicitTerm`` (iMAML / proximal, implicit function theorem with the Lagrangian for the exact HVP),
``UnrolledTerm`` (K-step MAML, autodiff through the steps) and ``DirectTerm`` (θ' = I, the direct-IF
baseline) differ in θ', the exact HVP and the training-instance scores.
"""

from __future__ import annotations

import torch
from torch.func import grad, hessian, jacfwd, jvp, vmap

from worker.attribution.meta.data import TaskData
from worker.attribution.meta.functional import FunctionalModel, RetainedGradient
from worker.attribution.meta.inner import (
    InnerInverse,
    inner_inverse,
    proximal_loss,
    solve_proximal,
    train_loss,
    unrolled_adapt,
    val_loss,
)
from worker.attribution.meta.options import InnerOptions
from worker.attribution.types import AttributionError


class TaskTerm:
    """Shared machinery; subclasses set ``theta`` and implement jac, jac_t, hvp_exact, dense_exact."""

    def __init__(self, fm: FunctionalModel, task: TaskData, lam: torch.Tensor) -> None:
        self.fm = fm
        self.task = task
        self.lam = lam
        self.theta: torch.Tensor = fm.theta_of(lam)
        self.inner_residual = 0.0
        self.inner_iterations = 0
        self._outer_graph: RetainedGradient | None = None

    # ----- the outer loss at (λ*, θ*) -----
    def outer(self, lam: torch.Tensor, theta: torch.Tensor, w_val: torch.Tensor | None = None) -> torch.Tensor:
        return val_loss(self.fm, self.task, lam, theta, w_val)

    def outer_partials(self, w_val: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(∂_λ L_O, ∂_θ L_O) at (λ*, θ*)."""
        d_lam, d_theta = grad(lambda lm, th: self.outer(lm, th, w_val), argnums=(0, 1))(self.lam, self.theta)
        return d_lam, d_theta

    def value(self) -> float:
        return float(self.outer(self.lam, self.theta))

    def gamma(self) -> float:
        """This task's share of Theorem 5.1's Γ: ‖∂_θ L_O‖₁."""
        return float(self.outer_partials()[1].abs().sum())

    # ----- θ' -----
    def jac(self, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def jac_t(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dense_jac(self) -> torch.Tensor:
        """θ' as a (p_θ, p) matrix (small models only)."""
        eye = torch.eye(self.fm.num_lambda, dtype=self.lam.dtype, device=self.lam.device)
        return torch.stack([self.jac(e) for e in eye], dim=1)

    # ----- gradients and Hessian products -----
    def total_grad(self, w_val: torch.Tensor | None = None) -> torch.Tensor:
        """g = ∂_λ L_O + θ'ᵀ ∂_θ L_O (with validation weights ``w_val`` if given)."""
        d_lam, d_theta = self.outer_partials(w_val)
        return d_lam + self.jac_t(d_theta)

    def _outer_hvp(self, v_lam: torch.Tensor, v_theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._outer_graph is None:
            self._outer_graph = RetainedGradient(self.outer, self.lam, self.theta)
        y_lam, y_theta = self._outer_graph.hvp(v_lam, v_theta)
        return y_lam, y_theta

    def hvp_drop(self, v: torch.Tensor) -> torch.Tensor:
        """Jᵀ ∇²L_O J v: the total Hessian without the third-order term H' (docs/methods.md, meta methods)."""
        y_lam, y_theta = self._outer_hvp(v, self.jac(v))
        return y_lam + self.jac_t(y_theta)

    def dense_drop(self) -> torch.Tensor:
        jac = self.dense_jac()
        p = self.fm.num_lambda

        def outer_flat(z: torch.Tensor) -> torch.Tensor:
            return self.outer(z[:p], z[p:])

        h: torch.Tensor = hessian(outer_flat)(torch.cat([self.lam, self.theta]))
        big_j = torch.cat([torch.eye(p, dtype=jac.dtype, device=jac.device), jac], dim=0)
        return big_j.T @ h @ big_j

    def hvp_exact(self, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dense_exact(self) -> torch.Tensor:
        raise NotImplementedError

    # ----- instance scores (ΔQ on removal for a direction s = s_Q) -----
    def val_scores(self, s: torch.Tensor) -> torch.Tensor:
        """ΔQ_{−z} = w_z s·D_λℓ_z for every validation instance z."""

        def losses(lm: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
            return self.fm.per_sample_losses(lm, th, self.task.x_val, self.task.y_val)

        directional: torch.Tensor = jvp(losses, (self.lam, self.theta), (s, self.jac(s)))[1]
        return self.task.w_val * directional

    def train_scores(self, s: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def removal_gradient(self, m_tr: torch.Tensor, m_val: torch.Tensor) -> torch.Tensor:
        """b = Σ_z m_z ∂_{w_z} ∇_λ f: with m = w on the removed instances, Δλ = (H + ρI)⁻¹ b."""
        raise NotImplementedError


class ImplicitTerm(TaskTerm):
    """iMAML / proximal inner problem at stationarity; exact HVP through the Lagrangian Φ."""

    def __init__(
        self,
        fm: FunctionalModel,
        task: TaskData,
        lam: torch.Tensor,
        options: InnerOptions,
        theta_start: torch.Tensor | None = None,
    ) -> None:
        super().__init__(fm, task, lam)
        self.options = options
        self.theta, self.inner_residual, self.inner_iterations = solve_proximal(fm, task, lam, options, theta_start)
        self.inverse: InnerInverse = inner_inverse(fm, task, lam, self.theta, options)
        self.u = self.inverse.solve(self.outer_partials()[1])  # u = A⁻¹ ∂_θ L_O
        self._inner_graph = RetainedGradient(self.inner_loss, lam, self.theta)  # blocks of ∇²L_I
        self._lagrangian_graph = RetainedGradient(self.lagrangian, lam, self.theta)  # third order inside
        self._zero_lam, self._zero_theta = torch.zeros_like(lam), torch.zeros_like(self.theta)

    def inner_loss(self, lam: torch.Tensor, theta: torch.Tensor, w_tr: torch.Tensor | None = None) -> torch.Tensor:
        return proximal_loss(self.fm, self.task, self.options.reg, lam, theta, w_tr)

    def _grad_theta_inner(self, lam: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        gradient: torch.Tensor = grad(self.inner_loss, argnums=1)(lam, theta)
        return gradient

    def jac(self, v: torch.Tensor) -> torch.Tensor:
        """θ'v = −A⁻¹ (∂_θ∂_λ L_I) v."""
        mixed = self._inner_graph.hvp(v, self._zero_theta)[1]
        return -self.inverse.solve(mixed)

    def jac_t(self, x: torch.Tensor) -> torch.Tensor:
        """θ'ᵀx = −(∂_λ∂_θ L_I) A⁻¹ x."""
        return -self._inner_graph.hvp(self._zero_lam, self.inverse.solve(x))[0]

    def dense_jac(self) -> torch.Tensor:
        mixed: torch.Tensor = jacfwd(lambda lm: self._grad_theta_inner(lm, self.theta))(self.lam)  # (p_θ, p)
        if self.inverse.kronecker is not None:  # θ' with the same approximate A⁻¹ as every other product
            return -self.inverse.solve(mixed)
        a = self.inverse.matrix  # A at θ*, formed once by inner_inverse (dense ihvp)
        if a is None:
            inner_hessian: torch.Tensor = hessian(lambda th: self.inner_loss(self.lam, th))(self.theta)
            a = inner_hessian
        solved: torch.Tensor = torch.linalg.solve(a, mixed)
        return -solved

    def lagrangian(self, lam: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """Φ = L_O − u·∂_θ L_I with u detached."""
        return self.outer(lam, theta) - (self.u * self._grad_theta_inner(lam, theta)).sum()

    def _lagrangian_hvp(self, v_lam: torch.Tensor, v_theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y_lam, y_theta = self._lagrangian_graph.hvp(v_lam, v_theta)
        return y_lam, y_theta

    def hvp_exact(self, v: torch.Tensor) -> torch.Tensor:
        y_lam, y_theta = self._lagrangian_hvp(v, self.jac(v))
        return y_lam + self.jac_t(y_theta)

    def dense_exact(self) -> torch.Tensor:
        jac = self.dense_jac()
        p = self.fm.num_lambda
        h: torch.Tensor = hessian(lambda z: self.lagrangian(z[:p], z[p:]))(torch.cat([self.lam, self.theta]))
        big_j = torch.cat([torch.eye(p, dtype=jac.dtype, device=jac.device), jac], dim=0)
        return big_j.T @ h @ big_j

    def _train_weight_derivative(self, s: torch.Tensor) -> torch.Tensor:
        """G_z = ∂_{w_z}[s·∇_λ f] for every training instance (adjoint of the inner solve)."""
        v = self.jac(s)
        _, y_theta = self._lagrangian_hvp(s, v)
        a_adj = -self.inverse.solve(y_theta)

        def psi(w: torch.Tensor) -> torch.Tensor:
            def coupling(lm: torch.Tensor, th: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                g_tr = grad(lambda t: train_loss(self.fm, self.task, lm, t, w))(th)
                return (self.u * g_tr).sum(), g_tr

            outputs = jvp(coupling, (self.lam, self.theta), (s, v))  # (coupling's outputs, their derivatives)
            g_tr: torch.Tensor = outputs[0][1]
            d_coupling: torch.Tensor = outputs[1][0]
            return (a_adj * g_tr).sum() - d_coupling

        derivative: torch.Tensor = grad(psi)(self.task.w_tr)
        return derivative

    def train_scores(self, s: torch.Tensor) -> torch.Tensor:
        """ΔQ_{−z} = w_z G_z = −s·D_λP_z (the two-stage instance-IF, docs/methods.md, meta methods)."""
        return self.task.w_tr * self._train_weight_derivative(s)

    def removal_gradient(self, m_tr: torch.Tensor, m_val: torch.Tensor) -> torch.Tensor:
        b: torch.Tensor = self.total_grad(m_val) if bool((m_val != 0).any()) else torch.zeros_like(self.lam)
        if bool((m_tr != 0).any()):
            g_tr = grad(lambda t: train_loss(self.fm, self.task, self.lam, t, m_tr))(self.theta)
            e = self.inverse.solve(g_tr)
            z_lam, z_theta = self._lagrangian_hvp(torch.zeros_like(self.lam), e)

            def coupling(lm: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
                g_tr: torch.Tensor = grad(lambda t: train_loss(self.fm, self.task, lm, t, m_tr))(th)
                return (self.u * g_tr).sum()

            k_lam, k_theta = grad(coupling, argnums=(0, 1))(self.lam, self.theta)
            b = b - (z_lam + k_lam) - self.jac_t(z_theta + k_theta)
        return b


class UnrolledTerm(TaskTerm):
    """K-step MAML: θ_K(λ) by differentiable gradient steps; exact HVP is forward-over-reverse."""

    def __init__(self, fm: FunctionalModel, task: TaskData, lam: torch.Tensor, options: InnerOptions) -> None:
        super().__init__(fm, task, lam)
        self.options = options
        with torch.enable_grad():  # graphs kept for one-backward-pass products
            self._lam_leaf = lam.detach().requires_grad_(True)
            self._theta_graph = self.adapt(self._lam_leaf)
            self.theta = self._theta_graph.detach()  # θ_K, adapted once
            self._objective_grad = torch.autograd.grad(
                self.outer(self._lam_leaf, self._theta_graph), self._lam_leaf, create_graph=True
            )[0]
            self._cotangent = torch.zeros_like(self.theta).requires_grad_(True)
            self._pullback_graph = torch.autograd.grad(
                self._theta_graph, self._lam_leaf, self._cotangent, create_graph=True
            )[0]
        residual = grad(lambda th: train_loss(fm, task, lam, th))(self.theta)
        self.inner_residual = float(residual.norm())
        self.inner_iterations = options.steps

    def adapt(self, lam: torch.Tensor, w_tr: torch.Tensor | None = None) -> torch.Tensor:
        return unrolled_adapt(self.fm, self.task, self.options, lam, w_tr)

    def objective(
        self, lam: torch.Tensor, w_tr: torch.Tensor | None = None, w_val: torch.Tensor | None = None
    ) -> torch.Tensor:
        """f(λ; w) = L_O(λ, θ_K(λ; w_tr); w_val)."""
        return self.outer(lam, self.adapt(lam, w_tr), w_val)

    def jac(self, v: torch.Tensor) -> torch.Tensor:
        """θ'v as the derivative of the (linear) pullback θ'ᵀx in x (double backward)."""
        return torch.autograd.grad(self._pullback_graph, self._cotangent, v, retain_graph=True)[0].detach()

    def jac_t(self, x: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(self._theta_graph, self._lam_leaf, x, retain_graph=True)[0].detach()

    def dense_jac(self) -> torch.Tensor:
        jacobian: torch.Tensor = jacfwd(self.adapt)(self.lam)
        return jacobian

    def hvp_exact(self, v: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(self._objective_grad, self._lam_leaf, v, retain_graph=True)[0].detach()

    def dense_exact(self) -> torch.Tensor:
        h: torch.Tensor = hessian(self.objective)(self.lam)
        return h

    def _weight_derivatives(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def directional(w_tr: torch.Tensor, w_val: torch.Tensor) -> torch.Tensor:
            derivative: torch.Tensor = jvp(lambda lm: self.objective(lm, w_tr, w_val), (self.lam,), (s,))[1]
            return derivative

        d_tr, d_val = grad(directional, argnums=(0, 1))(self.task.w_tr, self.task.w_val)
        return d_tr, d_val

    def train_scores(self, s: torch.Tensor) -> torch.Tensor:
        return self.task.w_tr * self._weight_derivatives(s)[0]

    def val_scores(self, s: torch.Tensor) -> torch.Tensor:
        return self.task.w_val * self._weight_derivatives(s)[1]

    def removal_gradient(self, m_tr: torch.Tensor, m_val: torch.Tensor) -> torch.Tensor:
        def gradient(w_tr: torch.Tensor, w_val: torch.Tensor) -> torch.Tensor:
            g: torch.Tensor = grad(self.objective)(self.lam, w_tr, w_val)
            return g

        b: torch.Tensor = jvp(gradient, (self.task.w_tr, self.task.w_val), (m_tr, m_val))[1]
        return b


class DirectTerm(TaskTerm):
    """Direct-IF baseline: θ_i from the inner procedure, but θ' = I (only adapted entries) and H = Σ ∇²L_O."""

    def __init__(self, adapted: TaskTerm) -> None:
        super().__init__(adapted.fm, adapted.task, adapted.lam)
        self.theta = adapted.theta
        self.inner_residual = adapted.inner_residual
        self.inner_iterations = adapted.inner_iterations

    def jac(self, v: torch.Tensor) -> torch.Tensor:
        return self.fm.theta_of(v)

    def jac_t(self, x: torch.Tensor) -> torch.Tensor:
        return self.fm.embed_theta(x)

    def dense_jac(self) -> torch.Tensor:
        eye = torch.eye(self.fm.num_lambda, dtype=self.lam.dtype, device=self.lam.device)
        return eye[self.fm.adapted_index]

    def hvp_exact(self, v: torch.Tensor) -> torch.Tensor:
        return self.hvp_drop(v)

    def dense_exact(self) -> torch.Tensor:
        return self.dense_drop()

    def train_scores(self, s: torch.Tensor) -> torch.Tensor:
        raise AttributionError("direct-IF (options.direct=true) has no training-instance scores; use task units")

    def removal_gradient(self, m_tr: torch.Tensor, m_val: torch.Tensor) -> torch.Tensor:
        if bool((m_tr != 0).any()):
            raise AttributionError("direct-IF (options.direct=true) cannot remove training instances")
        return self.total_grad(m_val)


def make_term(
    fm: FunctionalModel,
    task: TaskData,
    lam: torch.Tensor,
    options: InnerOptions,
    direct: bool = False,
    theta_start: torch.Tensor | None = None,
) -> TaskTerm:
    """The task's term at λ; ``theta_start`` warm-starts the implicit inner solve."""
    if options.mode == "implicit_proximal":
        term: TaskTerm = ImplicitTerm(fm, task, lam, options, theta_start)
    else:
        term = UnrolledTerm(fm, task, lam, options)
    return DirectTerm(term) if direct else term


class TotalProblem:
    """F(λ) = Σ_i f_i(λ) + (δ_o/2)‖λ‖² and its total Hessian (exact, Γ or drop-third-order)."""

    def __init__(self, terms: list[TaskTerm], lam: torch.Tensor, outer_l2: float, third_order: str) -> None:
        self.terms = terms
        self.lam = lam
        self.outer_l2 = outer_l2
        self.third_order = third_order
        self.gammas = [t.gamma() for t in terms] if third_order == "gamma" else [0.0] * len(terms)

    @property
    def gamma(self) -> float:
        return float(sum(self.gammas))

    def task_hvp(self, k: int, v: torch.Tensor) -> torch.Tensor:
        term = self.terms[k]
        if self.third_order == "exact":
            return term.hvp_exact(v)
        return term.hvp_drop(v) + self.gammas[k] * v

    def task_dense(self, k: int) -> torch.Tensor:
        term = self.terms[k]
        if self.third_order == "exact":
            return term.dense_exact()
        h = term.dense_drop()
        return h + self.gammas[k] * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)

    def dense_all(self) -> list[torch.Tensor]:
        """Every task's dense H_k: for the exact unrolled total Hessian, tasks with equal split sizes are
        batched into one vmapped ``hessian`` (same arithmetic as ``task_dense``, up to rounding)."""
        out: list[torch.Tensor | None] = [None] * len(self.terms)
        if self.third_order == "exact":
            groups: dict[tuple[tuple[int, ...], ...], list[int]] = {}
            unrolled: dict[int, UnrolledTerm] = {}
            for k, term in enumerate(self.terms):
                if type(term) is UnrolledTerm:
                    unrolled[k] = term
                    t = term.task
                    key = (tuple(t.x_tr.shape), tuple(t.y_tr.shape), tuple(t.x_val.shape), tuple(t.y_val.shape))
                    groups.setdefault(key, []).append(k)
            for ks in groups.values():
                if len(ks) > 1:
                    for k, h in zip(ks, _batched_unrolled_hessians([unrolled[k] for k in ks], self.lam), strict=True):
                        out[k] = h
        return [self.task_dense(k) if h is None else h for k, h in enumerate(out)]

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        out = self.outer_l2 * v
        for k in range(len(self.terms)):
            out = out + self.task_hvp(k, v)
        return out

    def gradient(self) -> torch.Tensor:
        out = self.outer_l2 * self.lam
        for term in self.terms:
            out = out + term.total_grad()
        return out


def _batched_unrolled_hessians(terms: list[UnrolledTerm], lam: torch.Tensor) -> torch.Tensor:
    """∇²f_k(λ) for tasks of equal split sizes, stacked (T, p, p), by one vmap over the tasks."""
    fm, options = terms[0].fm, terms[0].options

    def objective(
        lm: torch.Tensor,
        x_tr: torch.Tensor,
        y_tr: torch.Tensor,
        w_tr: torch.Tensor,
        x_val: torch.Tensor,
        y_val: torch.Tensor,
        w_val: torch.Tensor,
    ) -> torch.Tensor:
        theta = fm.theta_of(lm)
        step_grad = grad(lambda th, l2: fm.split_loss(l2, th, x_tr, y_tr, w_tr))
        for _ in range(options.steps):
            theta = theta - options.lr * step_grad(theta, lm)
        return fm.split_loss(lm, theta, x_val, y_val, w_val)

    stacked = [
        torch.stack([getattr(t.task, name) for t in terms])
        for name in ("x_tr", "y_tr", "w_tr", "x_val", "y_val", "w_val")
    ]
    hessians: torch.Tensor = vmap(hessian(objective), in_dims=(None, 0, 0, 0, 0, 0, 0))(lam, *stacked)
    return hessians
