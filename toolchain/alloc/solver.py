"""The bit-allocation integer program (a multiple-choice knapsack), solved exactly with python-mip.

    minimise   Σ_i Σ_b a_{i,b} · L_{i,b}
    subject to Σ_b a_{i,b} = 1                    (one bit-width per layer)
               Σ_i Σ_b a_{i,b} · M_{i,b} ≤ budget
               a_{i,b} ∈ {0, 1};  pinned layers have a single allowed b
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


def min_feasible_budget(costs: dict[str, dict[int, float]]) -> float:
    return sum(min(c.values()) for c in costs.values())


def solve(errors: dict[str, dict[int, float]], costs: dict[str, dict[int, float]], budget: float, time_limit: float = 60.0) -> Allocation:
    """``errors``/``costs``: layer → {bits: value}, over each layer's allowed bit-widths."""
    import mip

    floor = min_feasible_budget(costs)
    if budget < floor - 1e-9 * max(1.0, abs(floor)):
        raise InfeasibleBudgetError(f"budget {budget:.6g} is below the minimum feasible cost {floor:.6g} "
                                    f"(every layer at its cheapest allowed bit-width); raise the budget to at least {floor:.6g}")
    scale = max((abs(v) for e in errors.values() for v in e.values()), default=1.0) or 1.0  # keep CBC well conditioned
    model = mip.Model(sense=mip.MINIMIZE, solver_name=mip.CBC)
    model.verbose = 0
    choice = {(name, b): model.add_var(var_type=mip.BINARY) for name, options in costs.items() for b in options}
    for name, options in costs.items():
        model += mip.xsum(choice[name, b] for b in options) == 1
    model += mip.xsum(costs[n][b] * v for (n, b), v in choice.items()) <= budget
    model.objective = mip.xsum(errors[n][b] / scale * v for (n, b), v in choice.items())
    t0 = time.perf_counter()
    status = model.optimize(max_seconds=time_limit)
    seconds = time.perf_counter() - t0
    if status not in (mip.OptimizationStatus.OPTIMAL, mip.OptimizationStatus.FEASIBLE):
        raise InfeasibleBudgetError(f"the solver found no allocation within budget {budget:.6g} (status {status.name}); "
                                    f"the minimum feasible cost is {floor:.6g}")
    bits = {name: next(b for b in options if choice[name, b].x >= 0.5) for name, options in costs.items()}
    return Allocation(bits=bits, objective=sum(errors[n][b] for n, b in bits.items()), cost=sum(costs[n][b] for n, b in bits.items()),
                      budget=budget, status=status.name.lower(), seconds=seconds)
