"""The demo tells the whole story, from the first plan to a cutover with every success metric met."""

from __future__ import annotations

import re

from queries import SEED_MAPPING, fetch

from devkit import demo, scenario
from sync.mapping import load_mapping
from sync.render import console


async def test_the_demo_story_ends_in_a_cutover_with_every_metric_met(seed_dbs):
    source, target = seed_dbs
    built = demo.DemoDatabases(source.url, target.url, 0.0)
    # Without the Storage APIs, to stay quick: the files' part of a cutover is tested in test_cutover.
    with console.capture() as captured:
        code = await demo.tell(built, load_mapping(SEED_MAPPING), scenario.DEFAULT_SEED, files=False)
    told = captured.get()

    assert code == 0, told[-3000:]
    steps = ["$ sync plan --since 2024-11-18", "$ sync run --since 2024-11-18", "Production keeps going"]
    steps += [
        "$ sync run  (a catch-up",
        "$ sync cutover --yes --deletes apply",
        "Cutover: success metrics",
    ]
    assert [told.index(step) for step in steps] == sorted(told.index(step) for step in steps)
    assert "cutover verified: every metric met" in told
    # What production did after the first run is on the target: the sign-ups, and the deleted account gone.
    (signed_up,) = fetch(source.url, "SELECT id::text FROM auth.users WHERE email LIKE %s", "%10000002@%")[0]
    assert fetch(target.url, "SELECT count(*) FROM public.profiles WHERE id = %s", signed_up)[0][0] == 1
    gone = re.search(r"user ([0-9a-f-]{36}) deleted the account", told)
    assert gone is not None
    assert fetch(target.url, "SELECT count(*) FROM auth.users WHERE id = %s", gone[1])[0][0] == 0
