"""Expert selection from analysis.json: the exact sets each rule picks on a hand-built analysis, the refusals of bad
input, the mask file's round trip and its refusal of another model, and `connito select` end to end."""

import copy
import json
import os
import sys

import pytest
import torch

from connito.adaptation.config import SelectConfig
from connito.adaptation.run import run_select
from connito.adaptation.selection import SelectionError, load_analysis, pick_per_layer, select_experts
from connito.analysis.record import AnalysisRecord
from connito.analysis.summaries import experts_to_reach
from connito.experts import ExpertAddressError, ExpertMask, ExpertView
from connito.experts.mask_file import MaskFileError, read_mask_file, write_mask_file
from connito.models import ModelError
from connito.models.fingerprint import checkpoint_fingerprint

FINGERPRINT = "sha256:" + "ab" * 32

# Three decoder layers, layer 0 dense; four experts. Scores are ESFT-normalised per layer (each row sums to 1).
GATE = {
    "code": [[0.5, 0.3, 0.15, 0.05], [0.1, 0.1, 0.6, 0.2]],
    "docs": [[0.05, 0.15, 0.3, 0.5], [0.25, 0.25, 0.25, 0.25]],
    "prose": [[0.0] * 4, [0.0] * 4],
    "wiki": [[0.25] * 4, [0.25] * 4],
}
TOKEN = {
    "code": [[0.4, 0.4, 0.1, 0.1], [0.0, 0.2, 0.3, 0.5]],
    "docs": [[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]],
    "prose": [[0.0] * 4, [0.0] * 4],
    "wiki": [[0.25] * 4, [0.25] * 4],
}
DRIVER = {
    "code": [[0.03, -0.01, 0.01, 0.0], [-0.02, -0.01, -0.005, -0.001]],
    "docs": [[None] * 4, [None] * 4],
    "prose": [[None] * 4, [None] * 4],
    "wiki": [[-0.01] * 4, [-0.02, 0.0, -0.01, -0.03]],
}


def make_analysis(path: str = "/nowhere/model", fingerprint: str = FINGERPRINT, **model) -> dict:
    domains = ["code", "docs", "prose", "wiki"]
    return {
        "schema": "connito.analysis/1",
        "model": {
            "path": path,
            "fingerprint": fingerprint,
            "model_type": "deepseek_v2",
            "num_layers": 3,
            "moe_layers": [1, 2],
            "num_experts": 4,
            "top_k": 2,
            **model,
        },
        "data": {
            "split": "validation",
            "domains": domains,
            "tokens": {"code": 1000, "docs": 3000, "prose": 10, "wiki": 500},
            "usable": {"code": True, "docs": True, "prose": False, "wiki": True},
        },
        "esft": {"gate_score": copy.deepcopy(GATE), "selection_ratio": copy.deepcopy(TOKEN)},
        "drivers": {
            "factor_up": 2.0,
            "factor_down": 0.5,
            "tokens": {"code": 500, "docs": 0, "prose": 0, "wiki": 400},
            "loss": {"code": 3.0, "docs": None, "prose": None, "wiki": 3.5},
            "score": copy.deepcopy(DRIVER),
        },
    }


def chosen(mask: ExpertMask) -> dict[int, list[int]]:
    return {layer: [e for lay, e in mask.ids() if lay == layer] for layer in mask.moe_layers}


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [
        (1e-6, {1: [0], 2: [2]}),  # a tiny share still keeps the best expert of every layer
        (0.2, {1: [0], 2: [2]}),
        (0.5, {1: [0], 2: [2]}),  # 0.5 alone reaches 0.5
        (0.8, {1: [0, 1], 2: [2, 3]}),  # 0.5 + 0.3 reaches 0.8 despite float rounding
        (0.81, {1: [0, 1, 2], 2: [0, 2, 3]}),  # the 0.1 / 0.1 tie goes to the lower index
        (1.0, {1: [0, 1, 2, 3], 2: [0, 1, 2, 3]}),
    ],
)
def test_gate_selection_is_esfts_smallest_prefix_reaching_top_p(top_p, expected):
    mask = select_experts(make_analysis(), "gate", "code", top_p)
    assert chosen(mask) == expected
    assert mask.shape == (3, 4) and mask.moe_layers == (1, 2)


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [
        (0.01, {1: [0], 2: [3]}),
        (0.5, {1: [0, 1], 2: [3]}),
        (0.81, {1: [0, 1, 2], 2: [2, 3, 1]}),
        (1.0, {1: [0, 1, 2, 3], 2: [1, 2, 3]}),
    ],
)
def test_token_selection_reads_the_selection_ratio_and_never_keeps_an_unused_expert(top_p, expected):
    mask = select_experts(make_analysis(), "token", ["code"], top_p)
    assert chosen(mask) == {layer: sorted(experts) for layer, experts in expected.items()}


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"top_p": 0.2}, {1: [0], 2: []}),  # 0.03 is 75 % of layer 1's positive score; layer 2 has no driver
        ({"top_p": 0.8}, {1: [0, 2], 2: []}),
        ({"top_p": 1.0}, {1: [0, 2], 2: []}),  # the zero- and negative-score experts never
        ({"top_n": 1}, {1: [0], 2: []}),
        ({"top_n": 4}, {1: [0, 2], 2: []}),
    ],
)
def test_driver_selection_keeps_positive_scores_only(options, expected):
    assert chosen(select_experts(make_analysis(), "driver", "code", **options)) == expected


def test_top_n_keeps_the_n_best_of_every_layer():
    assert chosen(select_experts(make_analysis(), "gate", "code", top_n=2)) == {1: [0, 1], 2: [2, 3]}


def test_pooled_domains_weigh_scores_by_tokens_and_union_selects_each():
    # pooled layer 1 = (1000 * code + 3000 * docs) / 4000 = [0.1625, 0.1875, 0.2625, 0.3875]
    pooled = select_experts(make_analysis(), "gate", ["code", "docs"], 0.5)
    assert chosen(pooled) == {1: [2, 3], 2: [2, 3]}
    union = select_experts(make_analysis(), "gate", ["code", "docs"], 0.5, combine="union")
    assert chosen(union) == {1: [0, 3], 2: [0, 1, 2]}  # docs' layer-2 tie keeps experts 0 and 1


def test_the_cumulative_rule_counts_what_the_analysis_concentration_counts():
    torch.manual_seed(0)
    score_LE = torch.rand(6, 16) ** 4
    score_LE /= score_LE.sum(dim=-1, keepdim=True)
    for top_p in (0.05, 0.2, 0.5, 0.9, 1.0):
        counts_L = pick_per_layer(score_LE, top_p).sum(dim=-1)
        assert counts_L.tolist() == experts_to_reach(score_LE[None], [top_p])[0, :, 0].tolist()


def test_a_hand_written_list_in_either_form():
    analysis = make_analysis()
    by_pairs = select_experts(analysis, "list", experts=[[1, 3], [2, 0], [1, 3]])
    by_text = select_experts(analysis, "list", experts="1:3, 2:0")
    assert by_pairs == by_text and chosen(by_pairs) == {1: [3], 2: [0]}
    assert select_experts(analysis, "list", experts=["1:3", "2:0"]) == by_pairs


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        (("gate", "code", 0.0), {}, SelectionError, r"top_p=0.0 is outside \(0, 1\].*top_p=0.2"),
        (("gate", "code", 1.5), {}, SelectionError, r"top_p=1.5 is outside \(0, 1\]"),
        (("gate", "code", float("nan")), {}, SelectionError, r"top_p=nan is outside"),
        (("gate", "code"), {"top_n": 0}, SelectionError, r"top_n=0 must be .* between 1 and 4"),
        (("gate", "math"), {}, SelectionError, r"'math' is not in analysis.json .*code, docs, prose, wiki.*"
         r"usable for method=gate: code, docs, wiki"),
        (("token", ["code", "prose"]), {}, SelectionError, r"'prose' has no ESFT token-selection ratio .*10 tokens.*"
         r"usable for method=token: code, docs, wiki"),
        (("driver", "docs"), {}, SelectionError, r"'docs' has no driver score.*usable for method=driver: code, wiki"),
        (("driver", "wiki"), {}, SelectionError, r"no expert has a positive driver score for wiki, so the selection "
         r"is empty: .*method=gate"),
        (("gate", []), {}, SelectionError, r"name the domain\(s\).*domains=\[code\]"),
        (("esft", "code"), {}, SelectionError, r"method='esft' is not a selection method; .*'gate', 'token', "
         r"'driver', 'list'"),
        (("gate", "code"), {"combine": "mean"}, SelectionError, r"combine='mean' must be one of \['pool', 'union'\]"),
        (("list",), {"experts": []}, SelectionError, r"experts= is empty"),
        (("list",), {"experts": "1-3"}, SelectionError, r"'1-3' is not layer:expert"),
        (("list",), {"experts": "0:1"}, ExpertAddressError, r"layer 0 is a dense layer.*MoE layers are \[1, 2\]"),
        (("list",), {"experts": [[2, 4]]}, ExpertAddressError, r"expert 4 is out of range: layer 2 has 4 routed"),
        (("list",), {"experts": "3:0"}, ExpertAddressError, r"layer 3 is out of range: the model has 3 decoder"),
    ],
    ids=lambda x: None,
)  # fmt: skip
def test_bad_input_is_refused_with_the_fix(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        select_experts(make_analysis(), *args, **kwargs)


def test_driver_selection_without_a_driver_scan_says_how_to_get_one():
    analysis = make_analysis()
    analysis["drivers"] = None
    with pytest.raises(SelectionError, match=r"no driver scores .*drivers.enabled=true.*method=gate"):
        select_experts(analysis, "driver", "code")


def test_load_analysis_takes_the_file_or_its_directory_and_checks_the_schema(tmp_path):
    (tmp_path / "analysis.json").write_text(json.dumps(make_analysis()))
    loaded = load_analysis(tmp_path)
    assert loaded == load_analysis(tmp_path / "analysis.json") == AnalysisRecord.from_dict(make_analysis())
    assert loaded.model.fingerprint == FINGERPRINT and loaded.data.usable_domains == ["code", "docs", "wiki"]
    (tmp_path / "other.json").write_text(json.dumps({"schema": "connito.mask/1"}))
    with pytest.raises(SelectionError, match=r"not a Connito analysis: schema 'connito.mask/1'"):
        load_analysis(tmp_path / "other.json")
    with pytest.raises(SelectionError, match=r"no analysis.json at .*run `connito analyze"):
        load_analysis(tmp_path / "missing")


# -- mask files --------------------------------------------------------------------------------------------------


def test_mask_file_round_trip_and_refusals(tmp_path):
    analysis = make_analysis()
    mask = select_experts(analysis, "gate", "code", 0.8)
    selection = {"method": "gate", "domains": ["code"], "top_p": 0.8, "source": "analysis.json"}
    path = write_mask_file(tmp_path / "mask.json", mask, analysis["model"], selection)
    record = json.loads(path.read_text())
    assert record["schema"] == "connito.mask/1" and record["model"]["fingerprint"] == FINGERPRINT
    assert record["mask"] == {"shape": [3, 4], "moe_layers": [1, 2], "experts": {"1": [0, 1], "2": [2, 3]}}
    assert record["counts"]["per_layer"] == {"1": 2, "2": 2} and record["counts"]["routed_share"] == 0.5
    assert '"2": [2, 3]' in path.read_text()  # a layer's experts on one line

    loaded = read_mask_file(path, FINGERPRINT)
    assert loaded.mask == mask and loaded.selection == selection and loaded.model.num_experts == 4

    with pytest.raises(ModelError, match=r"made for another model .*connito analyze model_path="):
        read_mask_file(path, "sha256:" + "cd" * 32)
    record["mask"]["experts"]["2"] = [9]
    (tmp_path / "bad.json").write_text(json.dumps(record))
    with pytest.raises(MaskFileError, match=r"bad.json: its mask is malformed \(expert 9 is out of range"):
        read_mask_file(tmp_path / "bad.json", FINGERPRINT)
    (tmp_path / "analysis.json").write_text(json.dumps(analysis))
    with pytest.raises(MaskFileError, match=r"not a mask file: schema 'connito.analysis/1'.*connito select"):
        read_mask_file(tmp_path / "analysis.json", FINGERPRINT)
    (tmp_path / "bare.json").write_text(mask.to_json())
    with pytest.raises(MaskFileError, match=r"bare expert mask with no model fingerprint.*method=list"):
        read_mask_file(tmp_path / "bare.json", FINGERPRINT)
    with pytest.raises(ExpertAddressError, match=r"the mask covers 3 layers .* x 4 experts, the model 3 layers .* x 8"):
        write_mask_file(tmp_path / "x.json", mask, {**analysis["model"], "num_experts": 8}, selection)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two tiny Qwen3-MoE checkpoints of one shape (other seeds) and one of another shape."""
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("checkpoints")
    sizes = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 32, "moe_intermediate_size": 16,
             "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "num_experts_per_tok": 2}  # fmt: skip
    paths = {}
    for name, seed, layers, experts in (("a", 0, 3, 4), ("b", 1, 3, 4), ("wide", 0, 3, 8)):
        torch.manual_seed(seed)
        config = AutoConfig.for_model("qwen3_moe", num_hidden_layers=layers, num_experts=experts, **sizes)
        AutoModelForCausalLM.from_config(config).save_pretrained(root / name)
        paths[name] = root / name
    return paths


def checkpoint_analysis(path) -> dict:
    return make_analysis(str(path), checkpoint_fingerprint(path), model_type="qwen3_moe", moe_layers=[0, 1, 2],
                         num_layers=3)  # fmt: skip


def test_a_mask_file_belongs_to_its_checkpoint_only(checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    analysis = checkpoint_analysis(checkpoints["a"])
    analysis["esft"]["gate_score"]["code"].insert(0, [0.7, 0.1, 0.1, 0.1])  # layer 0 is an MoE layer here
    mask = select_experts(analysis, "gate", "code", 0.5)
    path = write_mask_file(tmp_path / "mask.json", mask, analysis["model"], {"method": "gate"})

    assert read_mask_file(path, checkpoints["a"]).mask == mask
    with pytest.raises(ModelError, match=r"made for another model .*same shape, other weights or config"):
        read_mask_file(path, checkpoints["b"])
    with pytest.raises(ExpertAddressError, match=r"mask for a qwen3_moe model of 3 layers x 4 experts; .* has 3 "
                       r"layers x 8 experts.*connito analyze model_path="):  # fmt: skip
        read_mask_file(path, checkpoints["wide"])
    wide_view = ExpertView(AutoModelForCausalLM.from_pretrained(checkpoints["wide"]))
    with pytest.raises(ExpertAddressError, match=r"this model has 3 layers \(MoE layers \[0, 1, 2\]\) x 8 experts"):
        read_mask_file(path, checkpoints["a"], view=wide_view)


def test_connito_select_end_to_end(checkpoints, tmp_path, monkeypatch, capsys):
    """Through the CLI's dispatch, YAML and typed config: the mask file lands beside analysis.json with its default
    name, carries the parameter share, and the printed summary says what each layer keeps."""
    from connito.cli.logs import LIBRARY_ENV_DEFAULTS
    from connito.cli.main import main

    analysis = checkpoint_analysis(checkpoints["a"])
    analysis["esft"]["gate_score"]["code"].insert(0, [0.7, 0.1, 0.1, 0.1])
    (tmp_path / "analysis").mkdir()
    (tmp_path / "analysis" / "analysis.json").write_text(json.dumps(analysis))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    for name in LIBRARY_ENV_DEFAULTS:
        monkeypatch.setenv(name, os.environ.get(name, LIBRARY_ENV_DEFAULTS[name]))
    main(["select", "analysis_path=analysis", "method=gate", "domains=[code]", "top_p=0.5"])

    path = tmp_path / "analysis" / "mask-gate-code-p0.5.json"
    loaded = read_mask_file(path, checkpoints["a"])
    assert chosen(loaded.mask) == {0: [0], 1: [0], 2: [2]}
    assert loaded.selection["source"] == str((tmp_path / "analysis" / "analysis.json").resolve())
    per_expert = 3 * 32 * 16  # gate, up and down projections of one expert
    parameters = loaded.counts.parameters
    assert parameters["selected"] == 3 * per_expert and parameters["total"] > 12 * per_expert
    out = capsys.readouterr().out
    assert "mask file:  analysis/mask-gate-code-p0.5.json" in out and "3 of 12 routed experts (25.0 %)" in out
    share = 100 * parameters["selected"] / parameters["total"]
    assert f"{share:.2f} % of the model's parameters" in out and "\n      2  1/4      2\n" in out

    cfg = SelectConfig(analysis_path=str(tmp_path / "analysis"), method="list", experts=["1:2,1:3"], out="m.json")
    assert chosen(run_select(cfg).mask) == {0: [], 1: [2, 3], 2: []}
