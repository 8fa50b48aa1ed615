"""The order tables are copied in: parents before children, and the links that break a foreign-key cycle.

A cycle among tables is broken on nullable links: those rows are inserted with the link NULL and
patched in a second pass. A cycle whose links are all NOT NULL cannot be broken and is a problem.
"""

from __future__ import annotations

import contextlib
import heapq
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, replace
from graphlib import CycleError, TopologicalSorter

from sync.plan.model import ParentLink, TablePlan


@dataclass(frozen=True)
class Order:
    """Tables parents first, each with its ``deferred`` links set; and what the order had to say."""

    tables: list[TablePlan]
    notes: list[str]
    """One line per deferred link."""
    problems: list[str]
    """One line per cycle that no nullable link breaks."""


def order_tables(plans: dict[str, TablePlan]) -> Order:
    """Parents first; a cycle is broken on a nullable link, deferred to a second pass."""
    links = {
        name: [link for link in plan.parents if link.parent in plans and link.parent != name]
        for name, plan in plans.items()
    }
    deferred: dict[str, list[ParentLink]] = {name: [] for name in plans}
    problems: list[str] = []
    for component in _components(plans, lambda n: [link.parent for link in links[n]]):
        if len(component) > 1:
            problem = _break_cycle(set(component), links, deferred)
            if problem:
                problems.append(problem)
    kept = {name: [link for link in links[name] if link not in deferred[name]] for name in plans}
    ordered = _topological(plans, lambda n: {link.parent for link in kept[n]})
    notes = [
        f"{name}: foreign key ({', '.join(link.columns)}) → {link.parent} closes a cycle: "
        f"inserted as NULL, then set in a second pass"
        for name in ordered
        for link in deferred[name]
    ]
    return Order([replace(plans[name], deferred=deferred[name]) for name in ordered], notes, problems)


def _break_cycle(
    component: set[str],
    links: dict[str, list[ParentLink]],
    deferred: dict[str, list[ParentLink]],
) -> str | None:
    """Defer as few nullable links of ``component`` as breaks every cycle; the problem when none can."""
    inner = [(name, link) for name in sorted(component) for link in links[name] if link.parent in component]
    kept = [(name, link) for name, link in inner if not link.nullable]
    cycle = _find_cycle(component, kept)
    if cycle:
        steps = " → ".join([*cycle, cycle[0]])
        columns = ", ".join(
            f"{name}.{'/'.join(link.columns)}" for name, link in inner if name in cycle and not link.nullable
        )
        return (
            f"foreign-key cycle {steps} cannot be broken: none of its links is nullable ({columns}); "
            f"make one of these columns nullable in target, or skip = true for one of the tables"
        )
    # Keep as many links as the order allows: each one deferred costs a second pass of updates.
    for name, link in inner:
        if link.nullable:
            if _find_cycle(component, [*kept, (name, link)]):
                deferred[name].append(link)
            else:
                kept.append((name, link))
    return None


def _components(nodes: Iterable[str], parents: Callable[[str], Iterable[str]]) -> list[list[str]]:
    """Strongly connected components (Tarjan's algorithm, iterative), each sorted by name."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for root in sorted(nodes):
        if root in index:
            continue
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        work = [(root, iter(sorted(parents(root))))]
        while work:
            node, todo = work[-1]
            for nxt in todo:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(parents(nxt)))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    caller = work[-1][0]
                    low[caller] = min(low[caller], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
    return components


def _find_cycle(nodes: set[str], links: Sequence[tuple[str, ParentLink]]) -> list[str]:
    """A cycle through ``links`` among ``nodes`` as the list of its tables, or [] when there is none."""
    graph: dict[str, list[str]] = {n: [] for n in nodes}
    for name, link in links:
        graph[name].append(link.parent)
    for component in _components(nodes, lambda n: graph[n]):
        if len(component) > 1:
            start = component[0]
            # Walk from start along links inside the component until it comes back: the component
            # is strongly connected, so a breadth-first search from start's parents reaches start.
            previous: dict[str, str] = {}
            frontier = [start]
            while frontier:
                step = []
                for node in frontier:
                    for nxt in sorted(graph[node]):
                        if nxt in component and nxt not in previous:
                            previous[nxt] = node
                            step.append(nxt)
                if start in previous:
                    break
                frontier = step
            path = [start]
            node = previous[start]
            while node != start:
                path.append(node)
                node = previous[node]
            return [path[0], *reversed(path[1:])]
    return []


def _topological(nodes: Collection[str], parents: Callable[[str], set[str]]) -> list[str]:
    """Nodes with every parent before its children; ties in name order.

    An unbroken cycle (already reported as a problem) leaves its tables, and every table below them,
    waiting: they are listed last, in name order.
    """
    sorter: TopologicalSorter[str] = TopologicalSorter({n: parents(n) for n in nodes})
    # The sorter still hands out every table a cycle does not hold back.
    with contextlib.suppress(CycleError):
        sorter.prepare()
    ready = list(sorter.get_ready())
    heapq.heapify(ready)
    ordered: list[str] = []
    while ready:
        name = heapq.heappop(ready)
        ordered.append(name)
        sorter.done(name)
        for child in sorter.get_ready():
            heapq.heappush(ready, child)
    placed = set(ordered)
    return ordered + sorted(n for n in nodes if n not in placed)
