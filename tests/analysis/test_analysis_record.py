"""The connito.analysis/1 record as a class: the file it writes is the writer's JSON byte for byte, fields read by
attribute, another schema and a newer version refused with the file, the schemas and the fix."""

import json

import pytest

from connito.analysis.expert_scores import SelectionError, load_analysis
from connito.analysis.record import AnalysisError, AnalysisRecord, as_analysis

FIX = (
    "run `connito analyze model_path=<checkpoint or run directory>` and point analysis_path= at the analysis.json it "
    "writes (or the directory holding it)"
)


def full_record() -> dict:
    """Every section, in the order connito.analysis.report writes them."""
    per_domain = {"code": [[0.75, 0.25]], "docs": [[0.5, 0.5]]}
    return {
        "schema": "connito.analysis/1",
        "model": {"path": "/m", "fingerprint": "sha256:" + "ab" * 32, "model_type": "qwen3_moe", "num_layers": 2,
                  "moe_layers": [1], "num_experts": 2, "top_k": 1},
        "data": {"split": "validation", "domains": ["code", "docs"], "tokens": {"code": 10, "docs": 0},
                 "usable": {"code": True, "docs": False}},
        "esft": {"gate_score": per_domain, "selection_ratio": per_domain},
        "router_score": per_domain,
        "concentration": {"thresholds": [0.5], "experts_needed": {"code": [[1]], "docs": [[1]]}},
        "specialisation": [[0.1, None]],
        "domain_experts": {"code": {"shape": [2, 2], "moe_layers": [1], "experts": {"1": [0]}}},
        "coactivation": [[[1.0, 0.0], [0.0, 1.0]]],
        "topk_overlap": {"top_n": 1, "sets": {"code": [[0]], "docs": [[1]]}, "jaccard": [[[1.0, 0.0], [0.0, 1.0]]]},
        "drivers": {"factor_up": 2.0, "factor_down": 0.5, "tokens": {"code": 5, "docs": 0},
                    "loss": {"code": 3.0, "docs": None}, "score": per_domain, "importance": per_domain},
        "sufficiency": None,
        "reweighting": None,
    }  # fmt: skip


def test_round_trip_is_byte_identical_to_the_writers_json_and_read_by_attribute(tmp_path):
    record = full_record()
    path = AnalysisRecord.from_dict(record).save(tmp_path / "analysis.json")
    assert path.read_text() == json.dumps(record, indent=1)
    loaded = AnalysisRecord.load(tmp_path)  # the directory holding it
    assert loaded.path == path and loaded.to_dict() == record
    assert loaded.model.moe_layers == (1,) and loaded.model.num_experts == 2 and loaded.model.top_k == 1
    assert loaded.data.usable_domains == ["code"] and loaded.esft.gate_score["code"] == [[0.75, 0.25]]
    assert loaded.drivers.tokens == {"code": 5, "docs": 0} and loaded.coactivation[0][0] == [1.0, 0.0]
    assert loaded == AnalysisRecord.from_dict(record), "equal records, wherever they were read from"
    assert as_analysis(record) == loaded and as_analysis(loaded) is loaded


def test_another_schema_is_refused_with_the_exact_message(tmp_path):
    path = tmp_path / "analysis.json"
    path.write_text(json.dumps({**full_record(), "schema": "connito.mask/1"}))
    with pytest.raises(AnalysisError) as caught:
        AnalysisRecord.load(path)
    assert str(caught.value) == (
        f"{path} is not a Connito analysis: schema 'connito.mask/1', expected 'connito.analysis/1'; {FIX}"
    )
    with pytest.raises(SelectionError, match="is not a Connito analysis: schema 'connito.mask/1'"):
        load_analysis(path)  # the readers' own error class


def test_a_future_version_is_refused_naming_the_upgrade(tmp_path):
    path = tmp_path / "analysis.json"
    path.write_text(json.dumps({**full_record(), "schema": "connito.analysis/2"}))
    with pytest.raises(AnalysisError) as caught:
        AnalysisRecord.load(path)
    assert str(caught.value) == (
        f"{path} is a Connito analysis of schema 'connito.analysis/2', newer than this Connito reads "
        f"('connito.analysis/1'): upgrade Connito, or {FIX}"
    )


def test_a_section_readers_need_is_named_when_missing(tmp_path):
    record = full_record()
    del record["esft"]["selection_ratio"]
    (tmp_path / "analysis.json").write_text(json.dumps(record))
    with pytest.raises(AnalysisError, match=r"section 'esft' lacks \['selection_ratio'\]; re-run `connito analyze`"):
        AnalysisRecord.load(tmp_path)
