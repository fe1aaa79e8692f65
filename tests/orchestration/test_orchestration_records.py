"""The pipeline's own records (connito.pipeline/1, connito.job/1) and the pipelines' records (FFT-MoE aggregation,
groups partition): round trip, another schema and a newer version refused with the file, the schemas and the fix."""

import json

import pytest

from connito.orchestration.jobs import Job, JobState, OrchestrationError, Stage, read_state, state_path, write_state
from connito.orchestration.plan import PLAN_FILE, PLAN_FIX, Plan, read_plan, write_plan
from tests.common.record_contract import check_record_kind, indented


def _plan() -> Plan:
    jobs = (Job("a", ("train", "x=1"), ("out/a",)), Job("b", ("train", "x=2"), ranks=2, workdir="w/b"))
    return Plan("btx", (Stage("branch", jobs, {"steps": 3}), Stage("merge", (Job("m", ("merge",)),))), {"seed": 0})


def test_plan_round_trip(tmp_path):
    path = _plan().save(tmp_path)
    assert path == tmp_path / PLAN_FILE and Plan.load(tmp_path) == _plan() == read_plan(tmp_path)
    assert json.loads(path.read_text()) == _plan().to_dict()
    assert write_plan(tmp_path, _plan()) is None, "the same plan again changes nothing"


def test_a_plan_of_another_schema_or_a_newer_version_is_refused(tmp_path):
    path = tmp_path / PLAN_FILE
    path.write_text(json.dumps({**_plan().to_dict(), "schema": "connito.job/1"}))
    with pytest.raises(OrchestrationError) as caught:
        read_plan(tmp_path)
    assert str(caught.value) == (
        f"{path} is not a pipeline plan: schema 'connito.job/1', expected 'connito.pipeline/1'; {PLAN_FIX}"
    )
    path.write_text(json.dumps({**_plan().to_dict(), "schema": "connito.pipeline/2"}))
    with pytest.raises(OrchestrationError) as caught:
        write_plan(tmp_path, _plan())  # a rerun over a newer Connito's pipeline stops before touching it
    assert str(caught.value) == (
        f"{path} is a pipeline plan of schema 'connito.pipeline/2', newer than this Connito reads "
        f"('connito.pipeline/1'): upgrade Connito, or {PLAN_FIX}"
    )


def test_job_state_round_trip_and_a_newer_version_refused(tmp_path):
    state = JobState("a", status="done", attempt=2, host="h", pid=7)
    write_state(tmp_path, state)
    assert read_state(tmp_path, "a") == state and read_state(tmp_path, "never-ran") == JobState("never-ran")
    path = state_path(tmp_path, "a")
    path.write_text(path.read_text().replace("connito.job/1", "connito.job/2"))
    with pytest.raises(OrchestrationError) as caught:
        read_state(tmp_path, "a")
    assert str(caught.value) == (
        f"{path} is a job state of schema 'connito.job/2', newer than this Connito reads ('connito.job/1'): upgrade "
        f"Connito, or delete {path} to run job a again (rerun=all starts the whole pipeline over)"
    )


AGGREGATION = {
    "schema": "connito.fft_moe.aggregation/1",
    "round": 0,
    "local_only": False,
    "accepted": ["docs"],
    "refused": {"code": "its package fails verification"},
    "contributors": {"0.0": ["docs"], "0.1": []},
    "bytes_uploaded": {"code": 1024, "docs": 1024},
}
PARTITION = {
    "schema": "connito.groups_partition/1",
    "base": "/r/base/hf",
    "analysis": "/r/analysis/analysis.json",
    "score": "token",
    "top_p": 0.2,
    "top_n": None,
    "overlap": "refuse",
    "groups": {"code": {"mask_file": "/r/groups/code.mask.json", "experts": [[0, 1], [1, 3]]}},
}


def test_aggregation_record_round_trip_byte_identity_and_refusals(tmp_path):
    from connito.orchestration.federated import AggregationRecord

    fix = "run the round's aggregation again (`connito federated` with the same settings)"
    check_record_kind(tmp_path, AggregationRecord, AGGREGATION, indented(1, ""), "FFT-MoE aggregation record", fix)
    record = AggregationRecord.load(tmp_path / "again.json")
    assert (record.accepted, record.bytes_uploaded["docs"]) == (["docs"], 1024)


def test_partition_record_round_trip_byte_identity_and_refusals(tmp_path):
    from connito.orchestration.groups import PartitionRecord

    fix = "run the partition job again (`connito groups` with the same settings)"
    check_record_kind(tmp_path, PartitionRecord, PARTITION, indented(1, "\n"), "groups partition record", fix)
    assert PartitionRecord.load(tmp_path / "again.json").groups["code"]["experts"] == [[0, 1], [1, 3]]
