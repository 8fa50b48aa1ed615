"""Proof that a refused command wrote nothing: a ``pg_dump`` of each database before and after, compared."""

from __future__ import annotations

import difflib
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

from devkit import testbed
from devkit.embedded import binaries_dir


def dump(db: testbed.Database) -> str:
    """Schema and data of ``db`` as the superuser sees them (``pg_dump``'s random restrict key dropped)."""
    out = subprocess.run(
        [str(binaries_dir() / "pg_dump"), "--no-sync", "--dbname", db.admin_url],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return "\n".join(line for line in out.splitlines() if not line.startswith(("\\restrict", "\\unrestrict")))


@contextmanager
def unchanged(*dbs: testbed.Database) -> Iterator[None]:
    """Assert that every database in ``dbs`` dumps byte for byte the same after the block as before it."""
    before = [dump(db) for db in dbs]
    yield
    for db, was in zip(dbs, before, strict=True):
        now = dump(db)
        if now != was:
            diff = "\n".join(list(difflib.unified_diff(was.splitlines(), now.splitlines(), lineterm=""))[:40])
            raise AssertionError(f"database {db.name} changed:\n{diff}")
