"""importance.batch_size=auto: sized from free memory by the planner's memory model, the same result as
any other batch size (up to summation order), the size a run started with kept on resume, recorded in
the manifest, and planned as a shard resolves it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from icl_scale import runs
from icl_scale.importance import ImportanceState, gradient_importance, importance_batch_size, importance_inputs
from icl_scale.models import zero
from icl_scale.plan_machine import SAFETY, Arch, arch_of_config, importance_step_bytes, planned_importance_batch
from icl_scale.shard import ShardRun, run_shard
from icl_scale.store import Shard, read_tensors
from icl_scale.tasks import build_requests

from conftest import compose, get_model, tiny_shard_cfg


def free_memory(monkeypatch, n_bytes: int) -> None:
    monkeypatch.setattr(zero, "least_free_memory", lambda: n_bytes)


def memory_for(lm, examples, batch: int) -> int:
    """Free memory that holds exactly `batch` of `examples` by the planner's model (the test's own sum)."""
    arch = Arch(**arch_of_config(lm.model.config, "test", count=False))
    length, scored = max(len(x) for x, _ in examples), max(len(c) for _, c in examples)
    return int(importance_step_bytes(arch, batch, length, scored, lm.dtype.itemsize) / SAFETY) + 1


@pytest.fixture(scope="module")
def copa(task_data):
    return build_requests("copa", split="train", shot=1, limit=7, data_dir=task_data)


def test_auto_grows_with_memory_and_is_one_when_memory_is_tiny(monkeypatch, copa):
    lm = get_model("tiny-opt")
    examples = importance_inputs(lm, copa)
    sizes = []
    for batch in (1, 2, 4):
        free_memory(monkeypatch, memory_for(lm, examples, batch))
        sizes.append(importance_batch_size(lm, examples, "auto"))
        free_memory(monkeypatch, memory_for(lm, examples, batch) - 2)  # one byte short: the next size down
        assert importance_batch_size(lm, examples, "auto") == max(1, batch // 2)
    assert sizes == [1, 2, 4]
    free_memory(monkeypatch, 1000)  # nothing fits: still one example per step
    assert importance_batch_size(lm, examples, "auto") == 1
    free_memory(monkeypatch, 10**15)  # everything fits: one step of all 7 examples (a rank's share)
    assert importance_batch_size(lm, examples, "auto") == 7
    assert importance_batch_size(lm, examples, 3) == 3  # an int is kept whatever the memory


def test_under_zero3_auto_leaves_the_live_parameter_budget_free(monkeypatch, copa):
    """Under ZeRO-3 the memory beside the parameters is the free memory less what may be whole at once
    (model.deepspeed.max_live_parameters, resolved): the masks-per-pass sizing's rule too."""
    lm = get_model("tiny-opt")
    examples = importance_inputs(lm, copa)
    live = memory_for(lm, examples, 8)  # parameters (float32 here): more than a step of all 7 examples
    partitioned = dataclasses.replace(lm, engine=object(), spec={**lm.spec, "deepspeed": {
        "stage3_max_live_parameters": live}})
    free_memory(monkeypatch, memory_for(lm, examples, 4) + 4 * live)
    assert zero.memory_beside_parameters(partitioned) == memory_for(lm, examples, 4)
    assert importance_batch_size(partitioned, examples, "auto") == 4
    assert importance_batch_size(lm, examples, "auto") == 7  # unpartitioned, all of it is free: one step


@pytest.mark.parametrize("abs_mode", ["per_token", "sum"])
def test_auto_gives_the_batch_size_one_importance(monkeypatch, copa, abs_mode):
    lm = get_model("tiny-opt")
    one = gradient_importance(lm, copa, batch_size=1, abs_mode=abs_mode)
    for batch in (4, 7):  # padded batches (4: two steps, the second partial; 7, all the memory wants: one step)
        free_memory(monkeypatch, memory_for(lm, importance_inputs(lm, copa), batch) if batch < 7 else 10**15)
        auto = gradient_importance(lm, copa, batch_size="auto", abs_mode=abs_mode)
        assert auto.batch_size == batch and one.batch_size == 1
        assert (auto.n_tokens, auto.n_cont_tokens) == (one.n_tokens, one.n_cont_tokens)  # the normalisers
        for normalize in ("paper", "all_tokens"):
            got, ref = auto.result(normalize=normalize), one.result(normalize=normalize)
            for k in ("heads", "ffn"):
                rel = float((got[k].double() - ref[k].double()).abs().max() / ref[k].double().abs().max())
                assert rel < 1e-5, (batch, normalize, k, rel)


def test_a_resumed_run_keeps_the_batch_size_it_started_with(monkeypatch, copa):
    """Free memory may differ after a restart: the checkpoint's size is reused, so the resumed run makes
    the steps (and the sums, bit for bit) of an unbroken run; an explicit int is the setting's."""
    lm = get_model("tiny-opt")
    examples = importance_inputs(lm, copa)
    free_memory(monkeypatch, memory_for(lm, examples, 2))
    unbroken = gradient_importance(lm, copa, batch_size="auto")
    saved = []

    def stop_after_two_steps(state):
        saved.append(state.tensors())
        if state.n_examples == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        gradient_importance(lm, copa, batch_size="auto", on_batch=stop_after_two_steps)
    ckpt = {k: v.clone() for k, v in saved[-1].items()}
    assert int(ckpt["batch_size"][0]) == 2 and int(ckpt["counts"][0]) == 4
    free_memory(monkeypatch, 10**15)  # the restart finds more memory: auto would now take all 7
    steps = []
    resumed = gradient_importance(lm, copa, batch_size="auto", state=ImportanceState.from_tensors(ckpt),
                                  on_batch=lambda s: steps.append(s.n_examples))
    assert resumed.batch_size == 2 and steps == [6, 7]
    assert torch.equal(resumed.heads, unbroken.heads) and torch.equal(resumed.ffn, unbroken.ffn)
    explicit = gradient_importance(lm, copa, batch_size=3, state=ImportanceState.from_tensors(ckpt))
    assert explicit.batch_size == 3
    old = {k: v for k, v in ckpt.items() if k != "batch_size"}  # a checkpoint from before sizes were kept
    assert gradient_importance(lm, copa, batch_size="auto", state=ImportanceState.from_tensors(old)).batch_size == 7


def test_shard_records_auto_and_resumes_with_it(monkeypatch, tmp_path):
    """A shard killed mid-importance with auto resolved to 2, restarted where auto would resolve to 8,
    finishes with 2 steps' size: its store equals a batch_size=2 shard's, and the manifest's `resolved`
    and the stage log say 2."""
    lm = get_model("tiny-opt")
    cfg = tiny_shard_cfg(tmp_path / "auto", "copa", 1, "tiny-opt", "importance.batch_size=auto")
    examples = importance_inputs(lm, ShardRun(cfg, lm).render().importance)
    free_memory(monkeypatch, memory_for(lm, examples, 2))

    def stop(run, stage, n_done):
        if stage == "importance" and n_done == 4:
            raise RuntimeError("injected failure mid-importance")

    with monkeypatch.context() as m, pytest.raises(RuntimeError, match="mid-importance"):
        m.setattr(runs, "CHECKPOINT_CALLBACKS", [*runs.CHECKPOINT_CALLBACKS, stop])
        run_shard(cfg, lm=lm)
    sh = Shard(tmp_path / "auto", "tiny-opt", "copa", 1)
    assert int(read_tensors(sh.ckpt("importance_state.safetensors"))["batch_size"][0]) == 2
    free_memory(monkeypatch, 10**15)
    logged = []
    monkeypatch.setattr("icl_scale.shard.log.info", lambda msg, *a: logged.append(msg % a))
    assert run_shard(cfg, lm=lm)["status"] == "complete"
    assert sh.manifest()["resolved"]["importance"]["batch_size"] == 2
    assert "stage importance: 8 examples, importance.batch_size=2 per rank per step (setting: auto)" in logged
    two = tiny_shard_cfg(tmp_path / "two", "copa", 1, "tiny-opt", "importance.batch_size=2")
    run_shard(two, lm=lm)
    ref = read_tensors(Shard(tmp_path / "two", "tiny-opt", "copa", 1).file("importance.safetensors"))
    got = read_tensors(sh.file("importance.safetensors"))
    assert all(torch.equal(got[k], ref[k]) for k in ("heads", "ffn"))  # the same steps: the same sums
    assert Shard(tmp_path / "two", "tiny-opt", "copa", 1).manifest()["resolved"]["importance"]["batch_size"] == 2


def test_the_planner_plans_auto_as_the_largest_importance_batch():
    from icl_scale import plan as P

    counts = P.TaskCounts("copa", 1, eval_docs=10, train_docs=3000, eval_tokens=200, eval_scored=8, imp_tokens=150,
                          imp_scored=4, multi_token=True, source="by hand")

    def plan_cfg(batch, gpu_mem_gb=80):
        return P.compose(["model=opt-66b", "gpus=8", f"gpu_mem_gb={gpu_mem_gb}", f"importance.batch_size={batch}"])

    cfg = plan_cfg("auto")
    pl, a = P.make_plan(cfg), P.Arch.from_spec(cfg["model"])
    auto = planned_importance_batch(cfg, a, 8)
    assert 1 < auto == min(pl.max_importance_batch, -(-int(cfg["importance"]["n_examples"]) // 8))
    assert planned_importance_batch(plan_cfg(3), a, 8) == 3  # an int is kept
    # the shard's importance steps are planned at the resolved size
    planned = P.shard_time(cfg, counts, 8).schedule.importance
    assert planned == P.shard_time(plan_cfg(auto), counts, 8).schedule.importance
    assert 1 <= planned_importance_batch(plan_cfg("auto", 20), a, 8) < auto  # less memory: a smaller batch


def test_bad_values_name_the_field(tmp_path):
    from icl_scale.settings import ConfigError
    from icl_scale.validation import check_config

    for value, msg in (("0", "importance.batch_size=0 must be >= 1"),
                       ("abc", "importance.batch_size='abc' must be auto or an integer")):
        with pytest.raises(ConfigError, match=msg):
            check_config(compose("model=tiny-opt", "task=copa", f"importance.batch_size={value}"))
    check_config(compose("model=tiny-opt", "task=copa", "importance.batch_size=auto"))
