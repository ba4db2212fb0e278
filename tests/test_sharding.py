"""CK_TEST_SHARD=i/n: the shards of a run are disjoint and together hold every test."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.cpu_only  # CI runs it; skipped under CK_TEST_DEVICE=cuda

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _collect(shard=None):
    env = {k: v for k, v in os.environ.items() if k != "CK_TEST_SHARD"}
    if shard:
        env["CK_TEST_SHARD"] = shard
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p",
                          "no:cacheprovider", "tests/test_errors.py"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    return out.returncode, [line for line in out.stdout.splitlines() if "::" in line], out


def test_shards_partition_the_suite():
    rc, full, out = _collect()
    assert rc == 0 and len(full) > 10, out.stdout + out.stderr
    parts = []
    for i in range(3):
        rc, got, out = _collect(f"{i}/3")
        assert rc == 0, out.stdout + out.stderr
        assert got, f"shard {i}/3 is empty"
        parts.append(got)
    flat = [t for p in parts for t in p]
    assert sorted(flat) == sorted(full) and len(set(flat)) == len(flat)


def test_bad_shard_is_a_usage_error():
    rc, _, out = _collect("3/3")
    assert rc != 0 and "CK_TEST_SHARD" in out.stdout + out.stderr


def test_shards_deal_tests_in_turn_and_keep_together_modules_whole():
    from types import SimpleNamespace as NS

    from conftest import TOGETHER, shard_items
    items = [NS(path=NS(name="test_a.py"), nodeid=f"test_a.py::t{i}") for i in range(7)] + \
        [NS(path=NS(name=TOGETHER[0]), nodeid=f"{TOGETHER[0]}::t{i}") for i in range(4)]
    shards = [shard_items(items, i, 3) for i in range(3)]
    assert sorted(id(x) for s in shards for x in s) == sorted(map(id, items))
    # test_a's seven tests spread 3/2/2; the module kept together lands in one shard.
    assert sorted(sum(x.path.name == "test_a.py" for x in s) for s in shards) == [2, 2, 3]
    assert sorted(sum(x.path.name == TOGETHER[0] for x in s) for s in shards) == [0, 0, 4]


def test_shards_deal_runs_of_consecutive_tests():
    from types import SimpleNamespace as NS

    from conftest import shard_items
    items = [NS(path=NS(name="test_a.py"), nodeid=f"test_a.py::t{i}") for i in range(100)]
    shards = [shard_items(items, i, 3, chunks_per_shard=2) for i in range(3)]
    # runs of ceil(100 / 6) = 17: shard 0 holds tests 0-16 and 51-67
    assert [int(x.nodeid.split("::t")[1]) for x in shards[0]] == \
        list(range(0, 17)) + list(range(51, 68))
    assert sorted(id(x) for s in shards for x in s) == sorted(map(id, items))
