"""The bit-allocation integer program (a multiple-choice knapsack), solved exactly by a MILP solver.

    minimise   Σ_i Σ_b a_{i,b} · L_{i,b}
    subject to Σ_b a_{i,b} = 1                    (one bit-width per layer)
               Σ_i Σ_b a_{i,b} · M_{i,b} ≤ budget
               a_{i,b} ∈ {0, 1};  pinned layers have a single allowed b

Two exact solvers: python-mip's CBC (the default where its ``cbcbox`` binaries are installed) and HiGHS
through ``scipy.optimize.milp`` (scipy is a dependency anyway; CBC's binaries are a 190 MB wheel that
machines such as the GPU hosts of ``benchmarks/device`` do not carry). Both solve to optimality, so they
return allocations of the same objective.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from toolchain.errors import InfeasibleBudgetError


@dataclass
class Allocation:
    bits: dict[str, int]
    objective: float
    cost: float
    budget: float
    status: str
    seconds: float
    solver: str = "cbc"


SOLVERS = ("auto", "cbc", "highs")


def _cbc_available() -> bool:
    try:
        import mip  # noqa: F401  (its import loads CBC's library from cbcbox)
    except Exception:  # ImportError, or cffi failing to open the shared library
        return False
    return True


def min_feasible_budget(costs: dict[str, dict[int, float]]) -> float:
    return sum(min(c.values()) for c in costs.values())


def solve(errors: dict[str, dict[int, float]], costs: dict[str, dict[int, float]], budget: float, time_limit: float = 60.0,
          solver: str = "auto") -> Allocation:
    """Exact minimum-error bit allocation under a cost budget.

    errors, costs: layer → {bits: value} over each layer's allowed bit-widths (floats, any unit; costs in the
    budget's unit, e.g. BOPs or bit·MACs). budget: upper bound on Σ cost. solver: "cbc" (python-mip),
    "highs" (scipy.optimize.milp) or "auto" (CBC if it can be loaded, else HiGHS).
    Raises InfeasibleBudgetError when the budget is below the cheapest allocation or no solution is found,
    ValueError for an unknown solver name. Source: QuantFace §3.3 (mixed-precision allocation as an IP)."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    floor = min_feasible_budget(costs)
    if budget < floor - 1e-9 * max(1.0, abs(floor)):
        raise InfeasibleBudgetError(f"budget {budget:.6g} is below the minimum feasible cost {floor:.6g} "
                                    f"(every layer at its cheapest allowed bit-width); raise the budget to at least {floor:.6g}")
    if solver == "auto":
        solver = "cbc" if _cbc_available() else "highs"
    elif solver == "cbc" and not _cbc_available():
        raise ValueError("solver 'cbc' needs python-mip with its CBC binaries (packages mip, cbcbox); use solver 'highs' or 'auto'")
    scale = max((abs(v) for e in errors.values() for v in e.values()), default=1.0) or 1.0  # keep the solver well conditioned
    keys = [(name, b) for name, options in costs.items() for b in options]
    t0 = time.perf_counter()
    if solver == "cbc":
        picked, status = _solve_cbc(keys, errors, costs, budget, scale, time_limit, floor)
    else:
        picked, status = _solve_highs(keys, errors, costs, budget, scale, time_limit, floor)
    seconds = time.perf_counter() - t0
    bits = {name: next(b for b in options if (name, b) in picked) for name, options in costs.items()}
    return Allocation(bits=bits, objective=sum(errors[n][b] for n, b in bits.items()), cost=sum(costs[n][b] for n, b in bits.items()),
                      budget=budget, status=status, seconds=seconds, solver=solver)


def _no_solution(budget: float, status: str, floor: float) -> InfeasibleBudgetError:
    return InfeasibleBudgetError(f"the solver found no allocation within budget {budget:.6g} (status {status}); "
                                 f"the minimum feasible cost is {floor:.6g}")


def _solve_cbc(keys, errors, costs, budget, scale, time_limit, floor) -> tuple[set, str]:
    import mip

    model = mip.Model(sense=mip.MINIMIZE, solver_name=mip.CBC)
    model.verbose = 0
    choice = {k: model.add_var(var_type=mip.BINARY) for k in keys}
    for name, options in costs.items():
        model += mip.xsum(choice[name, b] for b in options) == 1
    model += mip.xsum(costs[n][b] * v for (n, b), v in choice.items()) <= budget
    model.objective = mip.xsum(errors[n][b] / scale * v for (n, b), v in choice.items())
    status = model.optimize(max_seconds=time_limit)
    if status not in (mip.OptimizationStatus.OPTIMAL, mip.OptimizationStatus.FEASIBLE):
        raise _no_solution(budget, status.name, floor)
    return {k for k, v in choice.items() if v.x >= 0.5}, status.name.lower()


def _solve_highs(keys, errors, costs, budget, scale, time_limit, floor) -> tuple[set, str]:
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    index = {k: i for i, k in enumerate(keys)}
    layers = list(costs)
    one_hot = np.zeros((len(layers), len(keys)))
    for r, name in enumerate(layers):
        for b in costs[name]:
            one_hot[r, index[name, b]] = 1.0
    cost_row = np.array([[costs[n][b] for n, b in keys]])
    res = milp(c=np.array([errors[n][b] / scale for n, b in keys]), integrality=np.ones(len(keys)), bounds=Bounds(0, 1),
               constraints=[LinearConstraint(one_hot, 1, 1), LinearConstraint(cost_row, -np.inf, budget)],
               options={"time_limit": time_limit})
    if res.x is None or res.status not in (0, 1):  # 0 optimal; 1 time/iteration limit with a feasible point
        raise _no_solution(budget, f"highs {res.status}: {res.message}", floor)
    return {k for k in keys if res.x[index[k]] >= 0.5}, "optimal" if res.status == 0 else "feasible"
