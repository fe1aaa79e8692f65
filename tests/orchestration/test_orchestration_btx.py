"""``connito btx``: the plan it makes, the merge's refusal of an incomplete set, and (slow) whole pipelines: a branch
killed mid-training is rerun alone and the merge then equals an uninterrupted run's bit for bit; the same pipeline
as SLURM job arrays through a real ``sbatch``."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from connito.orchestration import OrchestrationError, read_plan
from connito.orchestration.btx import BtxConfig, plan_btx, run_merge
from connito.orchestration.jobs import read_state
from connito.orchestration.plan import write_plan
from tests.helpers import REPO, assert_same_bits, assert_same_final_state, clean_env
from tests.orchestration import pipelines

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def config(tmp_path, **changes) -> BtxConfig:
    return pipelines.config(BtxConfig, tmp_path, "btx", **{"domains": ["code", "docs"], **changes})


def test_the_plan_trains_a_seed_one_branch_per_domain_then_merges_fine_tunes_and_reports(tmp_path):
    plan = plan_btx(config(tmp_path))
    assert [s.name for s in plan.stages] == ["seed", "branches", "merge", "finetune", "report"]
    assert [j.name for j in plan.stages[1].jobs] == ["branch-code", "branch-docs", "dense"]
    dense = plan.job("dense").command
    assert "train.steps=400" in dense and not any(o.startswith("data.domains") for o in dense)
    code = plan.job("branch-code").command
    assert code[0] == "train" and "data.domains=['code']" in code and "train.steps=150" in code
    assert f"model.path='{tmp_path / 'btx' / 'seed' / 'hf'}'" in code
    finetune = plan.job("finetune").command
    assert "+callbacks.trainable.routers=true" not in finetune and "model.aux_loss_coef=0.01" in finetune
    assert plan.job("merge").command[:1] == ("btx",) and "stage=merge" in plan.job("merge").command
    assert plan.job("branch-code").outputs == (str(tmp_path / "btx" / "branch-code" / "hf" / "model.safetensors"),)


def test_plan_options(tmp_path):
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "config.json").write_text("{}")
    cfg = config(tmp_path, **{"seed.path": str(seed), "finetune.train": "router", "launcher.kind": "torchrun",
                              "launcher.nproc_per_node": 2, "train_overrides": ["optim.lr=0.001"]})  # fmt: skip
    plan = plan_btx(cfg)
    assert [s.name for s in plan.stages] == ["branches", "merge", "finetune", "report"]
    assert {j.ranks for j in plan.stages[0].jobs} == {2} and plan.job("merge").ranks == 1
    assert "+callbacks.trainable.routers=true" in plan.job("finetune").command
    assert plan.job("branch-docs").command[-1] == "optim.lr=0.001"
    with pytest.raises(ValueError, match="finetune.train='experts'"):
        plan_btx(config(tmp_path, **{"finetune.train": "experts"}))
    with pytest.raises(ValueError, match="at least 2 domains"):
        plan_btx(config(tmp_path, domains=["code"]))
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        plan_btx(config(tmp_path, **{"seed.path": str(tmp_path / "nowhere")}))
    # Chunks that do not divide the seed's FFN width are refused before any branch trains.
    assert plan_btx(config(tmp_path, **{"mix.chunks": 4})).stages[2].settings["mix"]["chunks"] == 4
    with pytest.raises(ValueError, match=r"mix.chunks=3 does not divide the seed's FFN width \(intermediate_size=256"):
        plan_btx(config(tmp_path, **{"mix.chunks": 3}))
    (seed / "config.json").write_text('{"intermediate_size": 96}')
    with pytest.raises(ValueError, match=r"mix.chunks=5 does not divide .*intermediate_size=96"):
        plan_btx(config(tmp_path, **{"seed.path": str(seed), "mix.chunks": 5}))
    with pytest.raises(ValueError, match="mix.chunks=0: expected a positive integer"):
        plan_btx(config(tmp_path, **{"mix.chunks": 0}))


def test_bam_is_a_mix_method_of_the_same_pipeline(tmp_path):
    plan = plan_btx(config(tmp_path, **{"mix.method": "bam", "mix.kv_sharing": True, "finetune.train": "router"}))
    assert [s.name for s in plan.stages] == ["seed", "branches", "merge", "finetune", "report"]
    assert plan.stages[2].settings["mix"]["method"] == "bam" and plan.stages[2].settings["mix"]["kv_sharing"]
    # router-only fine-tuning trains the attention experts' routers beside the FFN routers
    assert "+callbacks.trainable.modules=[model.layers.*.self_attn.router.weight]" in plan.job("finetune").command
    with pytest.raises(ValueError, match="mix.method='moe': choose one of btx, bam"):
        plan_btx(config(tmp_path, **{"mix.method": "moe"}))
    with pytest.raises(ValueError, match="shape BAM's attention experts: add mix.method=bam"):
        plan_btx(config(tmp_path, **{"mix.kv_sharing": True}))
    with pytest.raises(ValueError, match="mix.generalist and mix.chunks are BTX's options"):
        plan_btx(config(tmp_path, **{"mix.method": "bam", "mix.chunks": 2}))


def test_bts_is_a_mix_method_that_fine_tunes_its_stitches_alone(tmp_path):
    plan = plan_btx(config(tmp_path, **{"mix.method": "bts", "mix.stitch_every": 1, "finetune.train": "stitches"}))
    finetune = plan.job("finetune").command
    assert "+callbacks.trainable.modules=[stitches.*]" in finetune and "+callbacks.trainable.experts=[]" in finetune
    with pytest.raises(ValueError, match="trains the stitches alone: set finetune.train=stitches"):
        plan_btx(config(tmp_path, **{"mix.method": "bts"}))
    with pytest.raises(ValueError, match="finetune.train=stitches trains BTS's stitch layers: add mix.method=bts"):
        plan_btx(config(tmp_path, **{"finetune.train": "stitches"}))
    with pytest.raises(ValueError, match="mix.stitch_every places BTS's stitch layers"):
        plan_btx(config(tmp_path, **{"mix.stitch_every": 1}))


def test_the_merge_refuses_an_incomplete_set_of_branches(tmp_path):
    cfg = config(tmp_path)
    root = tmp_path / "btx"
    write_plan(root, plan_btx(cfg))
    with pytest.raises(OrchestrationError, match=r"not every branches job .* branch-code \(pending\), branch-docs"):
        run_merge(root)


def small(tmp_path: Path, data_cache: Path, name: str, *extra: str, **kwargs) -> list[str]:
    tiny = ["domains=[code,docs]", "seed.steps=4", "branch.steps=6", "finetune.enabled=false", "baseline.enabled=false",
            "eval_tokens=512"]  # fmt: skip
    return pipelines.small("btx", tmp_path, data_cache, name, *tiny, *extra, **kwargs)


btx = pipelines.connito


def weights(path: Path) -> dict:
    return load_file(path / "model.safetensors")


@pytest.mark.slow
def test_a_killed_branch_is_rerun_alone_and_the_merge_equals_an_uninterrupted_runs(tmp_path, data_cache):
    whole = btx(small(tmp_path, data_cache, "whole"), tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    root = tmp_path / "killed"
    seed = f"seed.path={tmp_path / 'whole' / 'seed' / 'hf'}"
    # The branch holds still after its step-2 checkpoint (tests/training/pause_callback.py), so the kill lands
    # mid-training however fast the machine is.
    pause = ["train.checkpoint_every=2", "plugins=[tests.training.pause_callback]", "+callbacks.pause.at_step=2",
             "+callbacks.pause.run=branch-code"]  # fmt: skip
    args = small(tmp_path, data_cache, "killed", seed, train=[*pipelines.TRAIN, *pause])
    env = clean_env(PYTHONPATH=str(REPO))  # the pause callback's module is importable from the repository
    first = subprocess.Popen([sys.executable, "-m", "connito", *args], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    paused = root / "branch-code" / "paused"
    deadline = time.monotonic() + 600
    while not paused.exists() and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.2)
    assert paused.exists(), first.communicate()[0][-3000:]
    assert (root / "branch-code" / "checkpoints" / "step_000002" / "COMPLETE").exists()
    os.killpg(os.getpgid(read_state(root, "branch-code").pid), signal.SIGKILL)  # the branch job, not the orchestrator
    out, _ = first.communicate(timeout=600)
    assert first.returncode == 1
    assert "branch-code: lost" in out and "nothing was merged" in out, out[-3000:]
    assert not (root / "merged").exists()
    assert read_state(root, "branch-docs").status == "done"  # the stage's other job still ran to its end
    again = btx(args, tmp_path, PYTHONPATH=str(REPO))
    assert again.returncode == 0, again.stderr[-3000:]
    assert read_state(root, "branch-code").attempt == 2 and read_state(root, "branch-docs").attempt == 1
    assert "resumed from" in (root / "logs" / "branch-code.log").read_text()
    # the resumed branch ends on the uninterrupted branch's weights and optimizer state, and so the merge does
    assert_same_final_state(tmp_path / "whole" / "branch-code", root / "branch-code")
    assert_same_bits(weights(root / "merged"), weights(tmp_path / "whole" / "merged"), "merged after the kill vs whole")
    report = json.loads((root / "btx_report.json").read_text())
    assert set(report["validation_loss"]) == {"seed", "branch code", "branch docs", "merged"}


@pytest.mark.slow
def test_bam_pipeline_end_to_end_writes_a_remote_code_checkpoint_it_fine_tunes_and_reports(tmp_path, data_cache):
    args = small(tmp_path, data_cache, "bam", "mix.method=bam", "mix.kv_sharing=true", "finetune.enabled=true",
                 "finetune.steps=3")  # fmt: skip
    done = btx(args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    root = tmp_path / "bam"
    config = json.loads((root / "merged" / "config.json").read_text())
    assert config["model_type"] == "connito_bam_mixtral"  # the tiny Llama seed upcycles into Mixtral's MoE
    assert config["kv_sharing"] and "auto_map" in config and (root / "merged" / "modeling_connito_bam.py").is_file()
    finetuned = json.loads((root / "finetune" / "hf" / "config.json").read_text())
    assert finetuned["model_type"] == config["model_type"] and "auto_map" in finetuned
    assert (root / "finetune" / "hf" / "modeling_connito_bam.py").is_file()  # the export carries its modeling code
    report = json.loads((root / "btx_report.json").read_text())
    assert set(report["validation_loss"]) == {
        "seed", "branch code", "branch docs", "merged (BAM)", "merged (BAM) + all fine-tuning"
    }  # fmt: skip


@pytest.mark.slow
def test_bts_pipeline_end_to_end_trains_only_the_stitches_and_reports_each_branch_opted_out(tmp_path, data_cache):
    args = small(tmp_path, data_cache, "bts", "mix.method=bts", "mix.stitch_every=1", "finetune.enabled=true",
                 "finetune.steps=3", "finetune.train=stitches")  # fmt: skip
    done = btx(args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    root = tmp_path / "bts"
    merged, finetuned = weights(root / "merged"), weights(root / "finetune" / "hf")
    assert merged.keys() == finetuned.keys()
    moved = {k for k in merged if not merged[k].equal(finetuned[k])}
    assert moved and all(k.startswith("stitches.") for k in moved), sorted(moved)[:5]  # hub, branches bit-identical
    assert (root / "finetune" / "hf" / "modeling_connito_bts.py").is_file()
    report = json.loads((root / "btx_report.json").read_text())
    final = "merged (BTS) + stitches fine-tuning"
    assert set(report["validation_loss"]) == {
        "seed", "branch code", "branch docs", "merged (BTS)", final, f"{final}, code opted out",
        f"{final}, docs opted out",
    }  # fmt: skip
    # the stitched model before training is the seed (zero projections)
    losses = report["validation_loss"]
    assert losses["merged (BTS)"] == pytest.approx(losses["seed"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.slurm
def test_btx_as_slurm_arrays_through_sbatch(tmp_path, data_cache, slurm_cluster):
    run = btx(small(tmp_path, data_cache, "slurm", "launcher.kind=slurm", "launcher.poll_seconds=1"), tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    root = tmp_path / "slurm"
    plan = read_plan(root)
    states = {job.name: read_state(root, job.name) for job in plan.jobs()}
    assert {s.status for s in states.values()} == {"done"}
    assert all(s.slurm_job for s in states.values())
    arrays = {name: s.slurm_job.split("_")[0] for name, s in states.items()}
    assert arrays["branch-code"] == arrays["branch-docs"] != arrays["merge"] != arrays["seed"]
    script = (root / "slurm" / "branches.sbatch").read_text()
    assert "#SBATCH --array=0-1" in script
    assert (root / "btx_report.md").is_file() and (root / "merged" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.distributed
def test_btx_with_torchrun_jobs_of_two_ranks_and_domain_mean_router_rows(tmp_path, data_cache):
    args = small(tmp_path, data_cache, "torchrun", "launcher.kind=torchrun", "launcher.nproc_per_node=2",
                 "launcher.max_parallel=2", "domains=[code,docs]", "mix.router_init=domain_means",
                 "mix.generalist=true", "mix.router_tokens=1024")  # fmt: skip
    run = btx(args, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    root = tmp_path / "torchrun"
    for job in ("seed", "branch-code", "branch-docs"):
        assert "distributed: world 2" in (root / "logs" / f"{job}.log").read_text()
    assert "merged:" in (root / "logs" / "merge.log").read_text()  # the merge is one process
    provenance = json.loads((root / "merged" / "connito_btx.json").read_text())
    assert provenance["router"]["init"] == "given tensor" and len(provenance["experts"]) == 3
