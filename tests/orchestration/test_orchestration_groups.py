"""``connito groups``: the plan it makes and the options it refuses, the merge's refusal of an incomplete set, and
(slow) a whole pipeline: disjoint groups, a merged checkpoint that is each group's experts on the base bit for bit,
and a group that hurts the other domains refused at the merge with the numbers, nothing written."""

import json
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

from connito.orchestration import OrchestrationError
from connito.orchestration.groups import GroupsConfig, plan_groups, run_merge, run_partition
from connito.orchestration.jobs import read_state
from connito.orchestration.plan import write_plan
from tests.orchestration import pipelines

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")


def config(tmp_path, **changes) -> GroupsConfig:
    return pipelines.config(GroupsConfig, tmp_path, "groups", **{"domains": ["code", "docs"], **changes})


def test_the_plan_trains_a_base_analyses_partitions_trains_one_group_per_domain_merges_and_reports(tmp_path):
    root = tmp_path / "groups"
    plan = plan_groups(config(tmp_path))
    assert [s.name for s in plan.stages] == ["base", "analyze", "partition", "groups", "merge", "report"]
    base = plan.job("base").command
    assert base[0] == "train" and "model=qwen3_moe_tiny" in base and "train.steps=300" in base
    analyze = plan.job("analyze").command
    assert analyze[0] == "analyze" and f"model_path='{root / 'base' / 'hf'}'" in analyze
    assert f"out_dir='{root / 'analysis'}'" in analyze and "data.domains=['code','docs']" in analyze
    assert "split=train" in analyze and "drivers.enabled=false" in analyze
    assert plan.job("analyze").outputs == (str(root / "analysis" / "analysis.json"),)
    assert plan.job("partition").command[:1] == ("groups",) and "stage=partition" in plan.job("partition").command
    assert str(root / "groups" / "docs.mask.json") in plan.job("partition").outputs
    assert [j.name for j in plan.stages[3].jobs] == ["group-code", "group-docs"]
    for domain in ("code", "docs"):
        job = plan.job(f"group-{domain}")
        assert job.command[0] == "adapt" and "method=esft" in job.command and "train.steps=150" in job.command
        assert f"esft.mask_file='{root / 'groups' / f'{domain}.mask.json'}'" in job.command
        assert f"data.domains=['{domain}']" in job.command
        assert f"model.path='{root / 'base' / 'hf'}'" in job.command
        assert job.outputs == (str(root / f"group-{domain}" / "hf" / "model.safetensors"),
                               str(root / f"group-{domain}" / "delta" / "manifest.json"))  # fmt: skip
    assert "stage=merge" in plan.job("merge").command and "stage=report" in plan.job("report").command
    assert plan.stages[-2].settings["merge"] == {"overlap": "refuse", "max_regression": 0.02, "validate": True}


def test_plan_options(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    cfg = config(tmp_path, **{"base.path": str(base), "partition.score": "driver", "launcher.kind": "torchrun",
                              "launcher.nproc_per_node": 2, "train_overrides": ["optim.lr=0.001"]})  # fmt: skip
    plan = plan_groups(cfg)
    assert [s.name for s in plan.stages] == ["analyze", "partition", "groups", "merge", "report"]
    assert "drivers.enabled=true" in plan.job("analyze").command
    assert f"model.path='{base}'" in plan.job("group-docs").command
    assert {j.ranks for j in plan.stages[2].jobs} == {2} and plan.job("merge").ranks == 1
    assert plan.job("group-docs").command[-1] == "optim.lr=0.001"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"domains": ["code"]}, r"at least 2 domains.*connito adapt method=esft"),
        ({"domains": ["code", "code"]}, "code given twice"),
        ({"domains": ["code", "cooking"]}, r"unknown domain\(s\) 'cooking'"),
        ({"data.source": "files"}, "data.source='files'"),
        ({"partition.score": "entropy"}, "partition.score='entropy': choose one of gate, token, driver"),
        ({"partition.overlap": "average"}, "partition.overlap='average': choose one of assign, refuse"),
        ({"partition.top_p": 0.0}, r"partition.top_p=0.0 is outside \(0, 1\]"),
        ({"partition.top_n": 0}, "partition.top_n=0"),
        ({"merge.overlap": "sum"}, "merge.overlap='sum': choose one of refuse, average, first"),
        ({"merge.max_regression": -1.0}, r"merge.max_regression=-1.0: a finite number of nats >= 0"),
        ({"group.steps": 0}, "group.steps=0: must be at least 1"),
        ({"base.model": "llama_tiny"}, "dense llama model: expert groups need a Mixture-of-Experts base"),
        ({"base.model": "nope"}, "base.model='nope' is not a model preset"),
    ],
)
def test_bad_options_are_refused_with_the_fix(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        plan_groups(config(tmp_path, **changes))


def test_a_base_path_must_be_an_moe_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        plan_groups(config(tmp_path, **{"base.path": str(tmp_path / "nowhere")}))
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="dense llama model"):
        plan_groups(config(tmp_path, **{"base.path": str(dense)}))


def test_the_merge_refuses_an_incomplete_set_of_groups_and_the_partition_a_missing_analysis(tmp_path):
    root = tmp_path / "groups"
    write_plan(root, plan_groups(config(tmp_path)))
    with pytest.raises(OrchestrationError, match=r"not every groups job .* group-code \(pending\), group-docs"):
        run_merge(root)
    assert not (root / "merged").exists()
    with pytest.raises(OrchestrationError, match=r"not every analyze job .* no group was formed"):
        run_partition(root)


def small(tmp_path: Path, data_cache: Path, name: str, *extra: str) -> list[str]:
    return pipelines.small("groups", tmp_path, data_cache, name, "domains=[code,docs]", "base.steps=4", "group.steps=6",
                           "partition.analysis_tokens=1024", "eval_tokens=512", *extra)  # fmt: skip


groups = pipelines.connito


def expert_of(name: str) -> tuple[int, int] | None:
    match = EXPERT.match(name)
    return (int(match[1]), int(match[2])) if match else None


def break_group(root: Path, domain: str) -> None:
    """Rewrite ``domain``'s delta package with its experts' weights times -20: a valid package of the base whose
    experts hurt every domain that routes to them (held-out loss +0.06 to +0.1 nats at this scale: a model this
    near uniform has little to lose)."""
    import torch

    from connito.analysis.held_out import load_checkpoint
    from connito.experts import ExpertMask, ExpertView
    from connito.experts.delta import save_delta

    model = load_checkpoint(root / f"group-{domain}" / "hf")
    view = ExpertView(model)
    ids = [tuple(e) for e in json.loads((root / "groups" / "partition.json").read_text())["groups"][domain]["experts"]]
    with torch.no_grad():
        for expert_id in ids:
            view.write_expert(expert_id, {k: -20 * t for k, t in view.read_expert(expert_id).items()})
    mask = ExpertMask.from_ids(ids, view.num_layers, view.num_experts, view.moe_layers)
    save_delta(model, root / "base" / "hf", root / f"group-{domain}" / "delta", experts=mask, overwrite=True)


@pytest.mark.slow
def test_groups_merge_onto_the_base_bit_for_bit_and_a_harmful_group_is_refused(tmp_path, data_cache):
    args = small(tmp_path, data_cache, "run")  # the default acceptance test: no domain may rise 0.02 nats
    run = groups(args, tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    root = tmp_path / "run"
    plan = json.loads((root / "pipeline.json").read_text())
    names = [job["name"] for stage in plan["stages"] for job in stage["jobs"]]
    assert {read_state(root, name).status for name in names} == {"done"}
    assert "group code:" in (root / "logs" / "partition.log").read_text()

    partition = json.loads((root / "groups" / "partition.json").read_text())["groups"]
    owner = {}
    for domain, group in partition.items():
        assert group["experts"], f"group {domain} is empty"
        for expert in map(tuple, group["experts"]):
            assert expert not in owner, f"expert {expert} is in groups {owner.get(expert)} and {domain}"
            owner[expert] = domain

    base = load_file(root / "base" / "hf" / "model.safetensors")
    merged = load_file(root / "merged" / "model.safetensors")
    adapted = {d: load_file(root / f"group-{d}" / "hf" / "model.safetensors") for d in ("code", "docs")}
    assert merged.keys() == base.keys()
    changed = set()
    for name, tensor in merged.items():
        expert = expert_of(name)
        domain = owner.get(expert) if expert else None
        if domain is None:  # routers, attention, norms, embeddings, experts of no group: the base's
            assert tensor.equal(base[name]), name
        else:
            assert tensor.equal(adapted[domain][name]), name
            changed |= {expert} if not tensor.equal(base[name]) else set()
        for d, weights in adapted.items():  # each job touched its own experts alone
            if owner.get(expert) != d:
                assert weights[name].equal(base[name]), f"group-{d} changed {name}"
    assert {owner[e] for e in changed} == {"code", "docs"}  # both groups trained something that reached the merge

    validation = json.loads((root / "merged" / "connito_groups.json").read_text())["validation"]
    assert set(validation["base"]) == set(validation["merged"]) == {"code", "docs"}
    report = json.loads((root / "groups_report.json").read_text())
    assert set(report["validation_loss"]) == {"base", "group code", "group docs", "merged"}
    assert report["validation_loss"]["merged"]["docs"] == pytest.approx(validation["merged"]["docs"], abs=1e-5)
    assert (root / "groups_report.md").is_file() and "| merged |" in run.stdout

    # a group whose experts hurt every domain: the merge job is refused with the numbers, nothing is written
    break_group(root, "code")
    stale = (root / "merged").rename(tmp_path / "stale-merged")  # its output gone: the merge job must run again
    again = groups(args, tmp_path)
    assert again.returncode == 1, again.stdout[-2000:]
    assert "rose more than allowed" in again.stderr and "REFUSED" in again.stderr, again.stderr[-3000:]
    assert "| code |" in again.stderr  # the table of numbers reaches the user, not just the log
    assert not (root / "merged").exists() and stale.is_dir()
    assert read_state(root, "merge").status == "failed" and read_state(root, "report").status == "pending"
    assert read_state(root, "group-code").attempt == 1  # the groups were not retrained
    assert "rose more than allowed" in (root / "logs" / "merge.log").read_text()
