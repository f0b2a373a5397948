"""Fleet assignment (reaper.daemon.fleet): rendezvous hashing with bounded loads, pure and deterministic."""

from __future__ import annotations

import collections
import random

from reaper.daemon.fleet import assign, assign_keys, owner_of, weight
from reaper.db.fleet import member_id, source_key


def keys(n: int, prefix: str = "src") -> list[int]:
    return [source_key(f"{prefix}{i}") for i in range(n)]


def members(n: int, prefix: str = "host:") -> list[int]:
    return [member_id(f"{prefix}{1000 + i}") for i in range(n)]


def test_keys_and_member_ids_are_stable_values_of_the_names() -> None:
    # blake2b, not Python's per-process hash(): every process and every version computes the same key
    assert source_key("db1") == source_key("db1") != source_key("db2")
    assert -(2**63) <= source_key("db1") < 2**63
    assert 0 <= member_id("a:1") < 2**31
    assert weight(1, 2) == weight(1, 2) != weight(2, 1)


def test_every_key_has_one_owner_and_no_member_owns_more_than_its_share_plus_one() -> None:
    rng = random.Random(7)
    for _ in range(200):
        n, m = rng.randint(1, 300), rng.randint(1, 12)
        ks = keys(n, prefix=f"s{rng.random()}-")
        ms = members(m, prefix=f"h{rng.random()}-")
        owners = assign_keys(ks, ms)
        assert set(owners) == set(ks)
        loads = collections.Counter(owners.values())
        assert set(loads) <= set(ms)
        assert max(loads.values()) <= -(-n // m) + 1


def test_sixty_sources_over_three_members_are_twenty_plus_minus_three_each_for_many_fleets() -> None:
    for trial in range(100):
        ms = members(3, prefix=f"fleet{trial}-")
        loads = collections.Counter(assign_keys(keys(60, prefix=f"t{trial}-"), ms).values())
        assert all(17 <= loads[m] <= 23 for m in ms), loads


def test_every_member_computes_the_same_answer_whatever_order_it_sees() -> None:
    ks, ms = keys(100), members(5)
    expected = assign_keys(ks, ms)
    for seed in range(10):
        shuffled_k, shuffled_m = ks[:], ms[:]
        random.Random(seed).shuffle(shuffled_k)
        random.Random(seed + 1).shuffle(shuffled_m)
        assert assign_keys(shuffled_k, shuffled_m) == expected


def test_a_joining_member_takes_about_its_share_and_few_others_move() -> None:
    total_moved = total_to_new = 0
    for trial in range(50):
        ks, ms = keys(120, prefix=f"j{trial}-"), members(4, prefix=f"j{trial}-")
        before, after = assign_keys(ks, ms[:3]), assign_keys(ks, ms)
        moved = [k for k in ks if before[k] != after[k]]
        to_new = [k for k in moved if after[k] == ms[3]]
        assert 120 // 4 - 4 <= len(to_new) <= 120 // 4 + 1
        assert len(moved) - len(to_new) <= 10  # the bounded loads shuffle a few between the old members
        total_moved, total_to_new = total_moved + len(moved), total_to_new + len(to_new)
    assert total_moved <= 1.15 * total_to_new  # on average, movement is nearly minimal


def test_a_leaving_members_sources_are_spread_and_the_others_mostly_stay() -> None:
    total_kept = total_others = 0
    for trial in range(50):
        ks, ms = keys(120, prefix=f"l{trial}-"), members(4, prefix=f"l{trial}-")
        before, after = assign_keys(ks, ms), assign_keys(ks, ms[:3])
        orphans = [k for k in ks if before[k] == ms[3]]
        assert {after[k] for k in orphans} <= set(ms[:3])
        assert len({after[k] for k in orphans}) >= 2  # spread, not all dumped on one member
        others = [k for k in ks if before[k] != ms[3]]
        kept = sum(before[k] == after[k] for k in others)
        total_kept, total_others = total_kept + kept, total_others + len(others)
    assert total_kept >= 0.95 * total_others


def test_names_with_the_same_key_are_owned_together() -> None:
    ms = members(3)
    owners = assign({"a": 42, "b": 42, "c": source_key("c")}, ms)
    assert owners["a"] == owners["b"] is not None


def test_no_members_own_nothing_and_one_member_owns_everything() -> None:
    assert assign_keys(keys(5), []) == {}
    assert owner_of(1, []) is None
    only = members(1)
    assert set(assign_keys(keys(50), only).values()) == set(only)
