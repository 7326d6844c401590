"""The KV-footprint routing policy (pure function) with stand-in replicas."""
from dataclasses import dataclass, field

import pytest

pytest.importorskip("ray")
from retroinfer.cluster.serve.routing import rank_replicas, request_footprint  # noqa: E402


@dataclass
class _Id:
    unique_id: str


@dataclass
class FakeReplica:
    name: str
    routing_stats: dict = field(default_factory=dict)

    @property
    def replica_id(self):
        return _Id(self.name)


def R(name, free=None, healthy=True):
    return FakeReplica(name, {} if free is None else {"free_bytes": free, "healthy": healthy})


def names(ranks):
    return [[r.name for r in rank] for rank in ranks]


def test_most_room_first_and_equal_room_shares_a_rank():
    reps = [R("a", 100), R("b", 300), R("c", 300), R("d", 200)]
    assert names(rank_replicas(reps, 50, set(), {})) == [["b", "c"], ["d"], ["a"]]


def test_fits_before_unknown_before_full():
    reps = [R("full", 10), R("new"), R("fits", 60), R("sick", 999, healthy=False)]
    assert names(rank_replicas(reps, 50, set(), {})) == [["fits"], ["new", "sick"], ["full"]]


def test_nothing_fits_still_returns_the_roomiest_so_the_replica_can_answer_429():
    reps = [R("a", 10), R("b", 40), R("c", 30)]
    assert names(rank_replicas(reps, 50, set(), {})) == [["b"]]


def test_bytes_sent_since_the_last_report_count_against_a_replica():
    reps = [R("a", 500), R("b", 400)]
    assert names(rank_replicas(reps, 100, set(), {})) == [["a"], ["b"]]
    assert names(rank_replicas(reps, 100, set(), {"a": 250})) == [["b"], ["a"]]      # a: 150 left, b: 300
    ranks = rank_replicas(reps, 100, set(), {"a": 450})                              # a: no longer fits
    assert names(ranks) == [["b"], ["a"]] and ranks[-1][0].routing_stats["free_bytes"] - 450 - 100 < 0


def test_exclude_skips_replicas_that_rejected_unless_none_is_left():
    reps = [R("a", 500), R("b", 400)]
    assert names(rank_replicas(reps, 100, {"a"}, {})) == [["b"]]
    assert names(rank_replicas(reps, 100, {"a", "b"}, {})) == [["a"], ["b"]]


def test_request_footprint_reads_the_call_kwargs():
    class PR:
        kwargs = {"kv_bytes": 4096, "exclude": ["x"], "target": None}
    assert request_footprint(PR()) == (4096, {"x"}, None)
    assert request_footprint(None) == (0, set(), None)
