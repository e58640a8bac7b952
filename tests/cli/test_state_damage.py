"""Every state file of both sides damaged at rest: recovered, or refused with the way out,
never a replica reported durable while it differs (tests/cli/state_damage.py).

`make test` runs one case per file, drawn at random (the seed is printed; set
STATE_DAMAGE_SEED to run the same ones again); `make test-long` runs the whole sweep, one
chain per file: a bit flipped at every byte (a spread of 64 in a larger file), every
truncation in the header, half and zero, two older copies put back, the file deleted.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.cli import state_damage as sd


def _check(outcomes: list[sd.Outcome]) -> None:
    print("\n" + sd.table(outcomes))
    failed = [f"{o.damage}: {o.detail}" for o in outcomes if o.result == "FAILED"]
    assert not failed, "\n".join(failed)


def test_state_files_damaged_at_rest_sampled(tmp_path: Path) -> None:
    seed = int(os.environ.get("STATE_DAMAGE_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"STATE_DAMAGE_SEED={seed}")
    rng = random.Random(seed)
    rig = sd.Rig(tmp_path)
    try:
        rig.build()
        cases: list[sd.Damage] = []
        flip = rng.randrange(2)  # every other file a flipped bit, the others another damage
        for i, (side, name) in enumerate(sd.FILES):
            every = sd.file_cases(rig, side, name, every=True)
            cases.append(rng.choice([c for c in every if (c.kind == "flip") == (i % 2 == flip)]))
        outcomes = sd.sweep(rig, cases)
    finally:
        rig.stop()
    for outcome in outcomes:
        print(f"{outcome.result:9} {outcome.damage}: {outcome.detail[:200]}")
    _check(outcomes)
    assert any(o.result == "refused" for o in outcomes)  # the receiver's damage is refused


@pytest.mark.long
@pytest.mark.parametrize(("side", "name"), sd.FILES, ids=[n for _, n in sd.FILES])
def test_state_files_damaged_at_rest_every_way(tmp_path: Path, side: str, name: str) -> None:
    rig = sd.Rig(tmp_path)
    try:
        rig.build()
        outcomes = sd.sweep(rig, sd.file_cases(rig, side, name, every=True))
    finally:
        rig.stop()
    _check(outcomes)
