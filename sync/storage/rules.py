"""The storage rules of a run, drawn from the mapping and the plan (so renames and remapped keys apply)."""

from __future__ import annotations

from sync.errors import PlanError
from sync.mapping import Mapping
from sync.plan import Plan
from sync.selection import key_owners
from sync.storage.select import BucketRule, ColumnRule, StorageRules


def storage_rules(plan: Plan, mapping: Mapping) -> StorageRules:
    """Each planned table's ``storage`` rule in source and target names, and the ``[storage]`` buckets.

    Raises PlanError (nothing written) for a rule the run could not follow.
    """
    columns, problems = [], []
    for tp in plan.tables:
        rule = mapping.rule(tp.name).storage
        if rule is None:
            continue
        sources = {c.target: c.source for c in tp.columns}
        where = f'[tables."{tp.name}"] storage'
        if len(tp.primary_key) != 1 or tp.primary_key[0] not in sources:
            problems.append(f"{where}: the table needs a single-column primary key that is copied")
            continue
        if rule.column not in sources:
            problems.append(f"{where}: column {rule.column!r} is not a copied column of {tp.name}")
            continue
        key = tp.primary_key[0]
        columns.append(
            ColumnRule(
                table=tp.name,
                key=key,
                column=rule.column,
                bucket=rule.bucket,
                owner_prefix=rule.owner_prefix,
                source_table=tp.source_name,
                source_key=sources[key],
                source_column=sources[rule.column],
                map_tables=tuple(key_owners(plan, tp.name)),
            )
        )
    if problems:
        raise PlanError(problems)
    buckets = tuple(BucketRule(bucket) for bucket in mapping.storage.buckets)
    return StorageRules(columns=tuple(columns), buckets=buckets)
