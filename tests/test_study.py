"""`lm-merge reproduce`: stage bookkeeping (skip, restart, fail), the report tables, and a tiny real study."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lightning_merge.errors import ConfigError
from lightning_merge.report import MERGE_COMPLETE
from lightning_merge.study import COMPLETE_MARKER, StageError, StageProcesses, TaskSpec, reproduce, study_stages
from lightning_merge.study_report import mean_se, write_study_report

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("vanilla", "ff", "ff+attn[head_perm]", "ff+attn[monotonic]", "ff+attn[ignore_heads]", "res[first]",
           "res[last]", "res[all]", "ff+attn+res", "ff+attn[linear]+res", "learned[attn=linear]")


def fake_results(barrier: float, metric: str | None = None) -> dict:
    lambdas = [0.0, 0.5, 1.0]
    curves, barriers = {}, {}
    for i, method in enumerate(METHODS):
        height = barrier / (i + 1)
        curves[method] = {"loss": [1.0, 1.0 + height, 1.0]}
        barriers[method] = {"barrier": height, "barrier_midpoint": height, "loss_a": 1.0, "loss_b": 1.0,
                            "midpoint_loss": 1.0 + height, "midpoint_excess": height}
        if metric:
            curves[method][metric] = [0.8, 0.8 - height / 10, 0.8]
            barriers[method][f"{metric}_barrier"] = height / 10
            barriers[method][f"midpoint_{metric}"] = 0.8 - height / 10
    methods = {method: {"function_preserving": method != "ff+attn[ignore_heads]"} for method in METHODS}
    endpoints = {"loss": [1.0, 1.0], **({metric: [0.8, 0.8]} if metric else {})}
    return {"lambdas": lambdas, "curves": curves, "barriers": barriers, "methods": methods, "endpoints": endpoints}


class FakeLm:
    """Stands in for the `lm-merge` subprocess: writes each stage's outputs, records calls, can fail or die."""

    def __init__(self, fail_on: str | None = None, die_on: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail_on, self.die_on = fail_on, die_on

    def __call__(self, command: list[str], stdout=None, stderr=None, env=None) -> subprocess.CompletedProcess:
        argv = command[3:]
        self.calls.append(argv)
        run_dir = Path(argv[argv.index("--trainer.default_root_dir") + 1])
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "partial").write_text("started")
        if self.die_on and self.die_on in str(run_dir):
            raise KeyboardInterrupt  # the user killed the study mid-stage
        if self.fail_on and self.fail_on in str(run_dir):
            stdout.write("error: something broke\n")
            return subprocess.CompletedProcess(command, 2)
        if argv[0] == "fit":
            (run_dir / "hf").mkdir(exist_ok=True)
            (run_dir / "hf" / "config.json").write_text("{}")
        else:
            metric = "accuracy" if "rt_polarity" in str(run_dir) else None
            (run_dir / "barriers.json").write_text("{}")
            (run_dir / "curves.csv").write_text("")
            (run_dir / "results.json").write_text(json.dumps(fake_results(0.3 + len(self.calls) / 100, metric)))
            (run_dir / MERGE_COMPLETE).write_text("{}")
        return subprocess.CompletedProcess(command, 0)


TASKS = {"rt_polarity": TaskSpec("configs/glue/rt_polarity.yaml", merge_args=["--data.init_args.task", "rt_polarity"])}


def test_stages_cover_seeds_tasks_and_pairs(tmp_path) -> None:
    stages = study_stages(tmp_path, [0, 1, 2], "p.yaml", [], "m.yaml", [], TASKS)
    names = [stage.name for stage in stages]
    assert names[:3] == ["pretrain seed 0", "pretrain seed 1", "pretrain seed 2"]
    assert sum(name.startswith("fine-tune") for name in names) == 3
    assert sum(name.startswith("merge mlm") for name in names) == 3
    assert sum(name.startswith("merge rt_polarity") for name in names) == 3
    merge = next(stage for stage in stages if stage.name == "merge rt_polarity seed0-seed2")
    assert str(tmp_path / "finetune/rt_polarity/seed2/hf") in merge.argv and "rt_polarity" in merge.argv


def test_rerun_skips_complete_stages_and_restarts_interrupted_ones(tmp_path, monkeypatch) -> None:
    study = tmp_path / "study"
    dying = FakeLm(die_on="merge/mlm/seed0-seed1")
    monkeypatch.setattr(StageProcesses, "run", dying)
    with pytest.raises(KeyboardInterrupt):
        reproduce(str(study), [0, 1], tasks=TASKS)
    assert (study / "merge/mlm/seed0-seed1/partial").exists()
    assert not (study / "merge/mlm/seed0-seed1" / COMPLETE_MARKER).exists()
    rerun = FakeLm()
    monkeypatch.setattr(StageProcesses, "run", rerun)
    report = reproduce(str(study), [0, 1], tasks=TASKS)
    assert [argv[0] for argv in rerun.calls] == ["merge", "merge"]  # the interrupted merge and the task merge only
    assert (report / "report.md").is_file()
    again = FakeLm()
    monkeypatch.setattr(StageProcesses, "run", again)
    reproduce(str(study), [0, 1], tasks=TASKS)
    assert again.calls == []


def test_changed_arguments_rerun_a_stage_and_what_depends_on_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(StageProcesses, "run", FakeLm())
    reproduce(str(tmp_path), [0, 1])
    changed = FakeLm()
    monkeypatch.setattr(StageProcesses, "run", changed)
    reproduce(str(tmp_path), [0, 1], pretrain_args=["--trainer.max_steps", "5"])
    assert [argv[0] for argv in changed.calls] == ["fit", "fit", "merge"]  # new pretraining invalidates the merge


def test_a_stage_folder_with_files_the_study_did_not_write_is_never_deleted(tmp_path, monkeypatch) -> None:
    study = tmp_path / "study"
    foreign = study / "pretrain" / "seed1" / "my_notes.txt"
    foreign.parent.mkdir(parents=True)
    foreign.write_text("mine")
    monkeypatch.setattr(StageProcesses, "run", FakeLm())
    with pytest.raises(StageError, match="pretrain seed 1.*holds files this study did not write.*nothing was deleted"):
        reproduce(str(study), [0, 1])
    assert foreign.read_text() == "mine"
    assert (study / "pretrain" / "seed0" / COMPLETE_MARKER).is_file()  # the stages before it ran


def test_failed_stage_names_its_log(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(StageProcesses, "run", FakeLm(fail_on="pretrain/seed1"))
    with pytest.raises(StageError, match=r"pretrain seed 1.*pretrain_seed_1\.log.*something broke"):
        reproduce(str(tmp_path), [0, 1])
    assert (tmp_path / "pretrain/seed0" / COMPLETE_MARKER).is_file()


class OverlapFakeLm(FakeLm):
    """A `FakeLm` whose stages take a moment; it checks each stage's inputs finished first and counts overlaps."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.lock, self.now, self.most, self.envs = threading.Lock(), 0, 0, []
        self.failed = threading.Event()

    def __call__(self, command, stdout=None, stderr=None, env=None):
        argv = command[3:]
        for flag in ("--model.init_args.init_from", "--model.init_args.model_a", "--model.init_args.model_b"):
            if flag in argv:  # the model a stage reads was written by a finished stage
                assert (Path(argv[argv.index(flag) + 1]).parent / COMPLETE_MARKER).is_file(), argv
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
            self.envs.append(env)
        if self.fail_on and self.fail_on in " ".join(argv):  # a failing stage fails at once
            self.failed.set()
        elif self.fail_on:  # the others finish well after it
            self.failed.wait(5)
            time.sleep(0.2)
        else:
            time.sleep(0.05)
        try:
            return super().__call__(command, stdout, stderr)
        finally:
            with self.lock:
                self.now -= 1


def test_two_jobs_run_stages_side_by_side_once_their_inputs_are_ready(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    parallel = OverlapFakeLm()
    monkeypatch.setattr(StageProcesses, "run", parallel)
    report = reproduce(str(tmp_path / "parallel"), [0, 1, 2], tasks=TASKS, jobs=2)
    sequential = FakeLm()
    monkeypatch.setattr(StageProcesses, "run", sequential)
    reproduce(str(tmp_path / "sequential"), [0, 1, 2], tasks=TASKS)
    assert parallel.most == 2 and sorted(map(str, parallel.calls)) == sorted(
        str(call).replace("sequential", "parallel") for call in sequential.calls)  # each stage once
    cores = len(os.sched_getaffinity(0))
    threads = [env["OMP_NUM_THREADS"] for env in parallel.envs]
    assert threads[:2] == [str(max(1, cores // 2))] * 2 and set(threads) <= {str(max(1, cores // 2)), str(cores)}
    assert (report / "report.md").is_file()


def test_a_stage_that_starts_alone_gets_every_core(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    fake = OverlapFakeLm()
    monkeypatch.setattr(StageProcesses, "run", fake)
    reproduce(str(tmp_path), [0, 1], jobs=2)  # two pretraining stages side by side, then the merge alone
    cores = len(os.sched_getaffinity(0))
    assert [env["OMP_NUM_THREADS"] for env in fake.envs] == [str(max(1, cores // 2))] * 2 + [str(cores)]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's setting stands
    fake = OverlapFakeLm()
    monkeypatch.setattr(StageProcesses, "run", fake)
    reproduce(str(tmp_path / "again"), [0, 1], jobs=2)
    assert fake.envs == [None] * 3


def test_after_a_failed_stage_no_new_stage_starts(tmp_path, monkeypatch) -> None:
    failing = OverlapFakeLm(fail_on="pretrain/seed1")
    monkeypatch.setattr(StageProcesses, "run", failing)
    with pytest.raises(StageError, match="pretrain seed 1"):
        reproduce(str(tmp_path), [0, 1, 2], tasks=TASKS, jobs=2)
    started = {Path(argv[argv.index("--trainer.default_root_dir") + 1]).relative_to(tmp_path) for argv in failing.calls}
    assert started == {Path("pretrain/seed0"), Path("pretrain/seed1")}  # seed 0 finished; nothing after seed 1
    assert (tmp_path / "pretrain/seed0" / COMPLETE_MARKER).is_file()
    with pytest.raises(ConfigError, match="jobs=0 must be at least 1"):
        reproduce(str(tmp_path), [0, 1], jobs=0)


@pytest.mark.parametrize("jobs", [1, 2])
def test_an_interrupted_study_stops_its_running_stages(tmp_path, monkeypatch, capsys, jobs) -> None:
    """SIGTERM to the orchestrator alone (a scheduler's cancel): its running stages are stopped, not orphaned, and
    stay incomplete; a rerun restarts them."""
    started: list[subprocess.Popen] = []
    real_popen = subprocess.Popen

    def sleeping_stage(command, **kwargs):  # every stage hangs until it is stopped
        process = real_popen([sys.executable, "-c", "import time; time.sleep(120)"], **kwargs)
        started.append(process)
        return process

    monkeypatch.setattr(subprocess, "Popen", sleeping_stage)
    handler = signal.getsignal(signal.SIGTERM)
    threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
    begun = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        reproduce(str(tmp_path), [0, 1], jobs=jobs)
    assert time.monotonic() - begun < 30 and len(started) == jobs  # the pretraining stages running at once
    assert all(process.poll() is not None for process in started)
    assert f"interrupted: stopped {jobs} running stage(s)" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) == handler  # the study's own handler is gone with it
    assert not list(tmp_path.glob("pretrain/*/" + COMPLETE_MARKER))
    monkeypatch.setattr(StageProcesses, "run", rerun := FakeLm())
    reproduce(str(tmp_path), [0, 1], jobs=jobs)
    assert sorted(argv[0] for argv in rerun.calls) == ["fit", "fit", "merge"]


def test_a_stopped_study_starts_no_new_stage() -> None:
    processes = StageProcesses()
    processes.stop_all()
    with pytest.raises(StageError, match="interrupted"):
        processes.run([sys.executable, "-c", "pass"])


def test_a_study_needs_two_distinct_seeds(tmp_path) -> None:
    with pytest.raises(ConfigError, match="two distinct seeds"):
        reproduce(str(tmp_path), [3, 3])


def test_report_tables_have_every_row_filled(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(StageProcesses, "run", FakeLm())
    report = reproduce(str(tmp_path), [0, 1, 2], tasks=TASKS)
    text = (report / "report.md").read_text()
    for heading in ("Table 1", "Table 2", "Table 3", "Every method (MLM)", "Every method (rt_polarity)"):
        assert heading in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "method" not in line and "task" not in line]
    assert rows and all("–" not in row for row in rows)
    assert "rt_polarity (accuracy)" in text
    every = text[text.index("Every method (MLM)"):text.index("Every method (rt_polarity)")]
    assert "| `learned[attn=linear]` |" in every and "| `ff+attn[ignore_heads]` |" in every
    assert every.count("| yes |") == len(METHODS) - 1 and every.count("| no |") == 1
    linear_row = next(line for line in every.splitlines() if line.startswith("| `ff+attn[linear]+res`"))
    assert " 90.0 ± 0.0 |" in linear_row  # 1 - (barrier / 10) / barrier of vanilla on every pair
    merged = text[text.index("The merged model"):text.index("![attention variants]")]
    assert "| method | MLM loss | excess over endpoints | rt_polarity accuracy |" in merged
    assert "| endpoints (mean of A and B) | 1.000 ± 0.000 | 0 | 0.800 ± 0.000 |" in merged
    assert merged.count("| `") == len(METHODS)
    for png in ("mlm_attention.png", "mlm_residual.png", "rt_polarity.png"):
        assert (report / png).stat().st_size > 0
    assert set(json.loads((report / "pairs.json").read_text())) == {"mlm", "rt_polarity"}


def test_mean_and_standard_error() -> None:
    assert mean_se([1.0]) == (1.0, 0.0)
    mean, se = mean_se([1.0, 2.0, 3.0])
    assert mean == 2.0 and se == pytest.approx((1.0 / 3) ** 0.5)


def test_report_of_an_incomplete_study_names_the_missing_pair(tmp_path) -> None:
    with pytest.raises(Exception, match="seed0-seed1"):
        write_study_report(tmp_path, [0, 1], [])


def test_multiberts_recipe_uses_hub_models_without_pretraining(tmp_path, monkeypatch) -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_function_arguments(reproduce)
    parser.add_argument("--config", action="config")
    config = parser.parse_args(["--config", str(ROOT / "configs/reproduce/multiberts.yaml")])
    tasks = {name: TaskSpec(**vars(spec)) for name, spec in config.tasks.items()}
    stages = study_stages(tmp_path, config.seeds, config.pretrain_config, [], config.mlm_merge_config, [], tasks,
                          config.pretrained, config.joint_methods)
    assert not any(stage.name.startswith("pretrain") for stage in stages)
    assert sum(stage.name.startswith("merge mlm seed") for stage in stages) == 10  # 5 seeds -> 10 pairs
    joint = next(stage for stage in stages if stage.name == "merge mlm jointly (5 models)")  # the N = 5 row
    models = json.loads(joint.argv[joint.argv.index("--model.init_args.models") + 1])
    assert models == [f"google/multiberts-seed_{seed}" for seed in range(1, 6)]
    assert len(tasks) == 8
    finetune = next(stage for stage in stages if stage.name == "fine-tune mrpc seed 3")
    assert "google/multiberts-seed_3" in finetune.argv and finetune.inputs == ()
    merge = next(stage for stage in stages if stage.name == "merge mlm seed1-seed5")
    assert {"google/multiberts-seed_1", "google/multiberts-seed_5"} <= set(merge.argv)


def test_an_edited_config_file_reruns_its_stages(tmp_path, monkeypatch) -> None:
    fit_config = tmp_path / "rt_polarity.yaml"
    fit_config.write_text((ROOT / "configs/glue/rt_polarity.yaml").read_text())
    tasks = {"rt_polarity": TaskSpec(str(fit_config), merge_args=["--data.init_args.task", "rt_polarity"])}
    monkeypatch.setattr(StageProcesses, "run", FakeLm())
    reproduce(str(tmp_path / "study"), [0, 1], tasks=tasks)
    fit_config.write_text(fit_config.read_text().replace("max_epochs: 2", "max_epochs: 3"))
    edited = FakeLm()
    monkeypatch.setattr(StageProcesses, "run", edited)
    reproduce(str(tmp_path / "study"), [0, 1], tasks=tasks)
    rerun_dirs = [argv[argv.index("--trainer.default_root_dir") + 1] for argv in edited.calls]
    assert len(rerun_dirs) == 3 and all("rt_polarity" in d for d in rerun_dirs)  # 2 fine-tunes + their merge


class TimedFakeLm(FakeLm):
    """A `FakeLm` whose stages take simulated seconds by kind (fit 120 s, merge 30 s) on a fake clock."""

    def __init__(self, clock: list[float], fit_seconds: float = 120.0) -> None:
        super().__init__()
        self.clock, self.fit_seconds = clock, fit_seconds

    def __call__(self, command: list[str], stdout=None, stderr=None, env=None) -> subprocess.CompletedProcess:
        self.clock[0] += self.fit_seconds if command[3] == "fit" else 30.0
        return super().__call__(command, stdout, stderr)


def test_each_stage_line_shows_its_expected_and_the_study_remaining_time(tmp_path, monkeypatch, capsys) -> None:
    import lightning_merge.study as study

    clock = [0.0]
    monkeypatch.setattr(study.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(StageProcesses, "run", TimedFakeLm(clock))
    reproduce(str(tmp_path), [0, 1, 2])  # 3 pretrain stages, then 3 merges
    lines = capsys.readouterr().out.splitlines()
    running = [line for line in lines if ": running" in line]
    assert running[0].endswith("no estimate yet; study: 6 stages not yet timed")
    # after one pretrain: the other two are expected to take as long; merges are not timed yet
    assert running[1].endswith("expected ~2.0 min; study ~4.0 min left + 3 stages not yet timed")
    assert running[4].endswith("expected ~0.5 min; study ~1.0 min left")
    last = [line for line in lines if "done in" in line][-1]
    assert last == "[6/6] merge mlm seed1-seed2: done in 30 s; no stage left"


def test_a_rerun_estimates_from_the_earlier_runs_times(tmp_path, monkeypatch, capsys) -> None:
    import lightning_merge.study as study

    clock = [0.0]
    monkeypatch.setattr(study.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(StageProcesses, "run", TimedFakeLm(clock))
    reproduce(str(tmp_path), [0, 1])
    capsys.readouterr()
    monkeypatch.setattr(StageProcesses, "run", TimedFakeLm(clock, fit_seconds=60.0))
    reproduce(str(tmp_path), [0, 1], pretrain_args=["--trainer.max_steps", "3"])  # every stage reruns
    running = [line for line in capsys.readouterr().out.splitlines() if ": running" in line]
    assert running[0].endswith("expected ~2.0 min; study ~4.5 min left")  # 2 pretrains and 1 merge, as last time
    # seed 0's new time replaces its old one: (60 + 120) / 2 s for seed 1, not (120 + 120 + 60) / 3
    assert running[1].endswith("expected ~1.5 min; study ~2.0 min left")


def test_the_last_stage_past_its_estimate_is_not_called_done(tmp_path) -> None:
    from lightning_merge.study import StudyClock

    stages = study_stages(tmp_path, [0, 1, 2], "configs/mlm.yaml", [], "configs/merge/mlm.yaml", [], {})
    clock = StudyClock(stages)
    for stage in stages[:-1]:
        clock.finished(stage, 30.0)
    assert clock.outlook(stages[-1], 45.0) == "0.8 min in, past its ~0.5 min estimate; the last stage"


def test_with_two_jobs_the_study_has_half_its_stages_time_left(tmp_path) -> None:
    from lightning_merge.study import StudyClock

    stages = study_stages(tmp_path, [0, 1, 2], "configs/mlm.yaml", [], "configs/merge/mlm.yaml", [], {})
    clock = StudyClock(stages, jobs=2)
    clock.finished(stages[0], 60.0)
    clock.finished(stages[1], 120.0)  # pretrain seed 2 (~90 s) and three merges left; merges not timed
    assert clock.outlook(None, 0.0) == "study ~1.5 min left + 3 stages not yet timed"  # one stage: not halved
    for stage in stages[2:5]:
        clock.finished(stage, 60.0)  # 90 s of pretraining; merges of 60 s
    assert clock.outlook(stages[5], 0.0) == "expected ~1.0 min; study ~1.0 min left"
    clock = StudyClock(stages, jobs=2)
    for stage in (stages[0], stages[3]):
        clock.finished(stage, 60.0)  # two pretrain stages and two merges of 60 s left: two at a time
    assert clock.outlook(None, 0.0) == "study ~2.0 min left"


def test_three_jobs_share_the_cores_among_the_stages_started_together(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)))
    fake = OverlapFakeLm()
    monkeypatch.setattr(StageProcesses, "run", fake)
    reproduce(str(tmp_path), [0, 1, 2], jobs=3)
    assert [env["OMP_NUM_THREADS"] for env in fake.envs[:3]] == ["2"] * 3  # three pretraining stages together
    assert fake.most == 3


def test_a_running_stage_reports_its_progress(tmp_path, monkeypatch, capsys) -> None:
    import time

    import lightning_merge.study as study

    class SlowFakeLm(FakeLm):
        def __call__(self, command, stdout=None, stderr=None, env=None):
            time.sleep(0.3)
            return super().__call__(command, stdout, stderr)

    monkeypatch.setattr(study, "PROGRESS_INTERVAL_S", 0.05)
    monkeypatch.setattr(StageProcesses, "run", SlowFakeLm())
    reproduce(str(tmp_path), [0, 1])
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("[1/3] pretrain seed 0: 0.0 min in, no estimate yet") for line in lines)
    assert any(line.startswith("[2/3] pretrain seed 1: 0.0 min in, ~0.0 min left") for line in lines)


def fake_joint_results(methods: list[str], seeds: int) -> dict:
    from lightning_merge.merge.joint_curves import JointPlan

    plan = JointPlan(methods, seeds, [0.0, 0.5, 1.0], pairwise=methods[:2], simplex_steps=2)
    losses = [1.0 + 0.5 * (max(p.weights) < 1) / (1 + plan.methods.index(p.method)) for p in plan.points]
    return {**plan.results(losses), "cycle_consistency_error": {m: 0.5 if m in methods[:2] else 0.0 for m in methods}}


def test_a_joint_merge_of_every_seed_adds_the_n_model_table(tmp_path, monkeypatch) -> None:
    joint = ["vanilla", "ff+attn+res", "merge_many", "cycle_consistent"]
    fake = FakeLm()

    def lm(command, stdout=None, stderr=None, env=None):
        argv = command[3:]
        if "--model.init_args.models" in argv:
            models = json.loads(argv[argv.index("--model.init_args.models") + 1])
            assert json.loads(argv[argv.index("--methods") + 1]) == joint and len(models) == 3
            run_dir = Path(argv[argv.index("--trainer.default_root_dir") + 1])
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "results.json").write_text(json.dumps(fake_joint_results(joint, len(models))))
            (run_dir / MERGE_COMPLETE).write_text("{}")
            return subprocess.CompletedProcess(command, 0)
        return fake(command, stdout, stderr)

    monkeypatch.setattr(StageProcesses, "run", staticmethod(lm))
    report = reproduce(str(tmp_path), [0, 1, 2], joint_methods=joint)
    text = (report / "report.md").read_text()
    table = text[text.index("### 3 models merged at once"):]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == joint
    assert "| `merge_many` | 0.167 ± 0.000 | – |" in table  # no pairwise merge ran merge_many
    assert "| 0.000 |" in rows[-1] and "| 0.500 |" in rows[1]  # cycle-consistency errors
    with pytest.raises(ConfigError, match="three models or more"):
        reproduce(str(tmp_path / "two"), [0, 1], joint_methods=joint)
