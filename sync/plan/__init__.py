"""The plan: which tables a run copies, in which order, column by column — or every reason it would lose data.

- :mod:`~sync.plan.model`: the plan's records (:class:`Plan`, :class:`TablePlan`, ...);
- :mod:`~sync.plan.build`: :func:`build_plan` and :func:`draft_plan`, pure, from the two catalogs and the
  mapping; :mod:`~sync.plan.drift` and :mod:`~sync.plan.order` are its notes and its table order;
- :mod:`~sync.plan.casts`: :func:`check_casts`, the one question put to the target;
- :mod:`~sync.plan.load`: ``load_plan`` and ``open_plan``, the plan read off both servers (imported from
  there: it connects, the rest of the package does not);
- :mod:`~sync.plan.report`: what ``sync plan --json`` prints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sync.lazy import lazy_names
from sync.plan.build import build_plan, draft_plan
from sync.plan.casts import check_casts
from sync.plan.model import AUTH_USERS, ParentLink, Plan, TablePlan

if TYPE_CHECKING:
    from sync.plan.report import PlanReport, TableReport, TriggerReport, UserReport

__all__ = [
    "AUTH_USERS",
    "ParentLink",
    "Plan",
    "PlanReport",
    "TablePlan",
    "TableReport",
    "TriggerReport",
    "UserReport",
    "build_plan",
    "check_casts",
    "draft_plan",
]

# Imported on first use: ``sync run`` uses the plan, never its report's models.
__getattr__ = lazy_names(
    __name__, dict.fromkeys(("PlanReport", "TableReport", "TriggerReport", "UserReport"), "sync.plan.report")
)
