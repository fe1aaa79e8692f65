"""``connito flexolmo``: the plan it makes, its refusals, the merge's refusal of an incomplete set of owners, and
(slow) the whole pipeline: the merged checkpoint holds each owner's expert and the public model's shared tensors bit
for bit, the report opts each owner out, and the checkpoint written without an owner's experts computes what the
merged model computes with that owner opted out."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, MixtralConfig

from connito.cli.commands.flexolmo import run as cli_run
from connito.orchestration import OrchestrationError, read_plan
from connito.orchestration.flexolmo import (
    FlexOlmoConfig,
    owner_mask,
    plan_flexolmo,
    run_evaluate,
    run_merge,
    run_remove,
)
from connito.orchestration.jobs import read_state
from connito.orchestration.plan import write_plan
from connito.routing.opt_out import OptOut, in_every_layer
from tests.orchestration import pipelines

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def config(tmp_path, **changes) -> FlexOlmoConfig:
    return pipelines.config(FlexOlmoConfig, tmp_path, "flex", **changes)


def test_the_plan_trains_a_public_model_prepares_and_trains_each_owner_then_merges_and_reports(tmp_path):
    plan = plan_flexolmo(config(tmp_path))
    root = tmp_path / "flex"
    assert [s.name for s in plan.stages] == ["public", "prepare", "owners", "merge", "report"]
    public = plan.job("public").command
    assert public[0] == "train" and "model=llama_tiny" in public and "data.domains=['prose','wiki']" in public
    assert [j.name for j in plan.stages[1].jobs] == ["prepare-code", "prepare-docs"]
    prepare = plan.job("prepare-docs")
    assert prepare.command[0] == "flexolmo" and "stage=prepare" in prepare.command
    assert "owner_name='docs'" in prepare.command
    assert prepare.outputs == (str(root / "start-docs" / "owner_mask.json"),)
    assert [j.name for j in plan.stages[2].jobs] == ["owner-code", "owner-docs"]
    for owner in ("code", "docs"):
        command = plan.job(f"owner-{owner}").command
        assert command[0] == "train" and "train.steps=150" in command
        assert f"data.domains=['{owner}']" in command
        assert f"model.path='{root / f'start-{owner}'}'" in command and "model.aux_loss_coef=0" in command
        assert f"+callbacks.trainable.mask_file='{root / f'start-{owner}' / 'owner_mask.json'}'" in command
        assert "+callbacks.trainable.router_rows=true" in command
        assert "+callbacks.trainable.routers=true" not in command
    assert "stage=merge" in plan.job("merge").command and "stage=report" in plan.job("report").command
    assert plan.settings["owners"] == ["code", "docs"] and plan.all_settings()["top_k"] == 2


def test_a_public_path_skips_the_public_stage(tmp_path):
    public = tmp_path / "public"
    public.mkdir()
    (public / "config.json").write_text("{}")
    cfg = config(tmp_path, **{"public.path": str(public), "owners": ["wiki"], "public.domains": ["code", "docs"],
                              "launcher.kind": "torchrun", "launcher.nproc_per_node": 2,
                              "train_overrides": ["optim.lr=0.001"]})  # fmt: skip
    plan = plan_flexolmo(cfg)
    assert [s.name for s in plan.stages] == ["prepare", "owners", "merge", "report"]
    assert plan.job("owner-wiki").ranks == 2 and plan.job("prepare-wiki").ranks == 1
    assert plan.job("owner-wiki").command[-1] == "optim.lr=0.001"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"owners": ["code", "math"]}, r"owners: unknown domain\(s\) 'math'; the known ones \(data.domains\): code, "
                                       r"docs, prose, wiki"),
        ({"owners": ["code", "prose"]}, r"owner\(s\) 'prose' also in public.domains"),
        ({"owners": []}, r"owners=\[\]: FlexOLMo needs at least 1 data owner"),
        ({"owners": ["code", "code"]}, r"code given twice"),
        ({"public.domains": ["prose", "poetry"]}, r"public.domains: unknown domain\(s\) 'poetry'"),
        ({"public.domains": []}, r"public.domains=\[\]"),
        ({"owner.router_init": "gritlm"}, r"owner.router_init='gritlm': choose one of mean_hidden, random"),
        ({"top_k": 4}, r"top_k=4: the merged model has 1 \+ 2 experts .* choose 1 to 3"),
        ({"opt_out": ["code"]}, r"opt_out and out are for a finished pipeline"),
        ({"data.source": "files"}, r"data.source='files'"),
        ({"public.path": "/nowhere"}, r"public.path='/nowhere' is not a checkpoint directory"),
    ],
)  # fmt: skip
def test_bad_inputs_are_refused_naming_the_fix(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        plan_flexolmo(config(tmp_path, **changes))


def test_the_merge_refuses_an_incomplete_set_of_owners_and_the_user_stages_an_unfinished_pipeline(tmp_path):
    root = tmp_path / "flex"
    write_plan(root, plan_flexolmo(config(tmp_path)))
    with pytest.raises(OrchestrationError, match=r"not every owners job .* owner-code \(pending\), owner-docs"):
        run_merge(root)
    assert not (root / "merged").exists()
    with pytest.raises(OrchestrationError, match=r"not every merge job .* there is no merged model yet"):
        run_evaluate(root, ["code"])
    with pytest.raises(ValueError, match=r"opt_out: unknown owner\(s\) 'wiki'; the owners: code, docs"):
        run_remove(root, ["wiki"], str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"stage=remove writes a new checkpoint: give its directory, out=DIR"):
        run_remove(root, ["code"], "")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"stage": "prepare"}, "give owner_name=<owner>"),
        ({"stage": "mix"}, "stage='mix': choose plan or one of prepare"),
    ],
)
def test_the_command_refuses_a_stage_it_cannot_run(tmp_path, capsys, changes, message):
    with pytest.raises(SystemExit):
        cli_run(config(tmp_path, **changes), tmp_path)
    assert message in capsys.readouterr().err


def test_the_owner_mask_is_expert_1_of_every_moe_layer(tmp_path):
    MixtralConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                  num_key_value_heads=1, num_local_experts=2, vocab_size=64).save_pretrained(tmp_path)  # fmt: skip
    mask = owner_mask(tmp_path)
    assert mask.shape == (3, 2) and [tuple(i) for i in mask.ids()] == [(0, 1), (1, 1), (2, 1)]


# -- the whole pipeline ------------------------------------------------------------------------------------------


def small(tmp_path: Path, data_cache: Path, name: str, *extra: str) -> list[str]:
    return pipelines.small("flexolmo", tmp_path, data_cache, name, "public.steps=4", "owner.steps=4",
                           "eval_tokens=2048", *extra)  # fmt: skip


flexolmo = pipelines.connito


def experts_of(weights: dict, layer: int, expert: int) -> dict:
    prefix = f"model.layers.{layer}.block_sparse_moe.experts.{expert}."
    return {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}


@pytest.mark.slow
def test_the_pipeline_merges_each_owner_bit_for_bit_reports_opt_outs_and_removes_an_owner(tmp_path, data_cache):
    done = flexolmo(small(tmp_path, data_cache, "flex"), tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    root = tmp_path / "flex"
    assert {read_state(root, job.name).status for job in read_plan(root).jobs()} == {"done"}

    public = load_file(root / "public" / "hf" / "model.safetensors")
    merged = load_file(root / "merged" / "model.safetensors")
    layers = 4  # llama_tiny
    shared = [k for k in merged if "block_sparse_moe" not in k]
    assert shared and all(torch.equal(merged[k], public[k]) for k in shared)
    for layer in range(layers):
        mlp = f"model.layers.{layer}.mlp."
        anchor = experts_of(merged, layer, 0)
        assert torch.equal(anchor["w1.weight"], public[mlp + "gate_proj.weight"])
        assert torch.equal(anchor["w3.weight"], public[mlp + "up_proj.weight"])
        assert torch.equal(anchor["w2.weight"], public[mlp + "down_proj.weight"])
    for index, owner in enumerate(["code", "docs"], start=1):
        trained = load_file(root / f"owner-{owner}" / "hf" / "model.safetensors")
        start = load_file(root / f"start-{owner}" / "model.safetensors")
        for layer in range(layers):
            ours, theirs = experts_of(merged, layer, index), experts_of(trained, layer, 1)
            assert ours.keys() == theirs.keys() == {"w1.weight", "w2.weight", "w3.weight"}
            assert all(torch.equal(ours[k], theirs[k]) for k in ours)
            assert not torch.equal(theirs["w1.weight"], experts_of(start, layer, 1)["w1.weight"])  # it trained
            gate = f"model.layers.{layer}.block_sparse_moe.gate.weight"
            assert torch.equal(trained[gate][0], start[gate][0])  # the public router row stayed frozen
            assert not torch.equal(trained[gate][1], start[gate][1])  # the owner's row trained
            assert torch.equal(merged[gate][index], trained[gate][1]) and torch.equal(merged[gate][0], start[gate][0])

    report = json.loads((root / "flexolmo_report.json").read_text())
    rows = report["validation_loss"]
    assert list(rows) == ["public", "owner code", "owner docs", "merged", "merged, code opted out",
                          "merged, docs opted out"]  # fmt: skip
    assert set(report["opt_out_change_percent"]) == {"code", "docs"}
    assert all(v == v for row in rows.values() for v in row.values()), rows  # no domain without held-out tokens
    # top-2 of the 2 experts left: opting one owner out computes exactly what the other owner's model computes
    assert rows["merged, code opted out"] == rows["owner docs"] and rows["merged, docs opted out"] == rows["owner code"]

    out = tmp_path / "without-code"
    removed = flexolmo([*small(tmp_path, data_cache, "flex")[:3], "stage=remove", "opt_out=[code]", f"out={out}"],
                       tmp_path)  # fmt: skip
    assert removed.returncode == 0, removed.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["num_local_experts"] == 2 and config["num_experts_per_tok"] == 2
    smaller = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    full = AutoModelForCausalLM.from_pretrained(root / "merged", local_files_only=True).eval()
    ids = torch.randint(0, full.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), OptOut(full, in_every_layer(1)):
        opted_out = full(ids).logits
    with torch.no_grad():
        plain = smaller(ids).logits
        assert not torch.equal(full(ids).logits, opted_out)  # opting code out changes the model's output
    assert torch.equal(plain, opted_out)  # bit for bit, not within a tolerance
