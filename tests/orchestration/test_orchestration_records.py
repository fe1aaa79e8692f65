"""The pipeline's own records (connito.pipeline/1, connito.job/1): round trip, another schema and a newer version
refused with the file, the schemas and the fix."""

import json

import pytest

from connito.orchestration.jobs import Job, JobState, OrchestrationError, Stage, read_state, state_path, write_state
from connito.orchestration.plan import PLAN_FILE, PLAN_FIX, Plan, read_plan, write_plan


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
AGGREGATION_FIX = "run the round's aggregation again (`connito federated` with the same settings)"


def test_aggregation_record_round_trip_is_byte_identical_to_the_old_format(tmp_path):
    from connito.orchestration.federated import AggregationRecord

    path = tmp_path / "aggregation.json"
    path.write_text(json.dumps(AGGREGATION, indent=1))  # as atomic_write_json wrote it before the class
    record = AggregationRecord.load(path)
    assert (record.accepted, record.bytes_uploaded["docs"]) == (["docs"], 1024) and record.to_dict() == AGGREGATION
    record.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == path.read_bytes()


@pytest.mark.parametrize(
    ("found", "message"),
    [
        ("connito.job/1", "{path} is not a FFT-MoE aggregation record: schema 'connito.job/1', expected "
                          "'connito.fft_moe.aggregation/1'; " + AGGREGATION_FIX),
        ("connito.fft_moe.aggregation/2", "{path} is a FFT-MoE aggregation record of schema "
         "'connito.fft_moe.aggregation/2', newer than this Connito reads ('connito.fft_moe.aggregation/1'): upgrade "
         "Connito, or " + AGGREGATION_FIX),
    ],
    ids=["another-kind", "future-version"],
)  # fmt: skip
def test_aggregation_record_of_another_kind_or_a_newer_version_is_refused(tmp_path, found, message):
    from connito.common.records import RecordError
    from connito.orchestration.federated import AggregationRecord

    path = tmp_path / "aggregation.json"
    path.write_text(json.dumps({**AGGREGATION, "schema": found}, indent=1))
    with pytest.raises(RecordError) as caught:
        AggregationRecord.load(path)
    assert str(caught.value) == message.format(path=path)


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
PARTITION_FIX = "run the partition job again (`connito groups` with the same settings)"


def test_partition_record_round_trip_is_byte_identical_to_the_old_format(tmp_path):
    from connito.orchestration.groups import PartitionRecord

    path = tmp_path / "partition.json"
    path.write_text(json.dumps(PARTITION, indent=1) + "\n")  # as atomic_write_json(..., end="\n") wrote it
    record = PartitionRecord.load(path)
    assert record.groups["code"]["experts"] == [[0, 1], [1, 3]] and record.to_dict() == PARTITION
    record.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == path.read_bytes()


@pytest.mark.parametrize(
    ("found", "message"),
    [
        ("connito.mask/1", "{path} is not a groups partition record: schema 'connito.mask/1', expected "
                           "'connito.groups_partition/1'; " + PARTITION_FIX),
        ("connito.groups_partition/2", "{path} is a groups partition record of schema "
         "'connito.groups_partition/2', newer than this Connito reads ('connito.groups_partition/1'): upgrade "
         "Connito, or " + PARTITION_FIX),
    ],
    ids=["another-kind", "future-version"],
)  # fmt: skip
def test_partition_record_of_another_kind_or_a_newer_version_is_refused(tmp_path, found, message):
    from connito.common.records import RecordError
    from connito.orchestration.groups import PartitionRecord

    path = tmp_path / "partition.json"
    path.write_text(json.dumps({**PARTITION, "schema": found}, indent=1) + "\n")
    with pytest.raises(RecordError) as caught:
        PartitionRecord.load(path)
    assert str(caught.value) == message.format(path=path)
