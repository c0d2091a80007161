"""The GPU check (benchmarks/gpu_check.py, scripts/gpu_check.sh): its dry run, its refusal to present CPU figures
as GPU ones, its summary, and one part rehearsed on the CPU."""
import json
import subprocess

import pytest

from benchmarks import gpu_check
from conftest import REPO


def test_the_dry_run_lists_every_part_and_exits_0(capsys):
    gpu_check.main(dry_run=True)
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines[1:]] == [part.name for part in gpu_check.PARTS]
    assert all(": would run " in line for line in lines[1:])


def test_without_a_gpu_nothing_runs_and_it_says_so(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    gpu_check.main(out=str(tmp_path / "out"))
    assert capsys.readouterr().out.startswith("no CUDA device: nothing is run")
    assert not (tmp_path / "out").exists()


def test_the_shell_wrapper_dry_run():
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "would run" in done.stdout and "tests: would run" in done.stdout


def test_an_unknown_part_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as stopped:
        gpu_check.main(only="tests,gpus")
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --only gpus: unknown part")


def test_a_failing_part_is_reported_and_the_summary_is_written(tmp_path):
    def broken(ctx):
        raise RuntimeError("no NCCL here")

    def skipped(ctx):
        raise gpu_check.PartFailed("skipped (the real pair is not converted)")

    ctx = gpu_check.Context(tmp_path, deadline=1e12)
    results = [gpu_check.run_part(gpu_check.Part("a", "x", lambda c: {"s_per_step": 0.5}), ctx),
               gpu_check.run_part(gpu_check.Part("b", "x", broken), ctx),
               gpu_check.run_part(gpu_check.Part("c", "x", skipped), ctx),
               gpu_check.run_part(gpu_check.Part("d", "x", lambda c: ({"json": "d.json"}, "| a |\n| --- |")), ctx)]
    text = gpu_check.write_summary(tmp_path, results, {"device": "NVIDIA H100", "date": "today"})
    assert [r.status for r in results] == ["ok", "failed (RuntimeError: no NCCL here)",
                                           "skipped (the real pair is not converted)", "ok"]
    assert text.startswith("# GPU check (NVIDIA H100, today)")
    assert '| a | ok | 0 | {"s_per_step": 0.5} |' in text and "## d\n\n| a |" in text
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["device"] == "NVIDIA H100" and [p["name"] for p in saved["parts"]] == ["a", "b", "c", "d"]
    assert (tmp_path / "summary.md").read_text() == text


def test_a_command_past_its_limit_is_stopped(tmp_path):
    ctx = gpu_check.Context(tmp_path, deadline=1e12)
    with pytest.raises(gpu_check.PartFailed, match="timed out after 1 s"):
        gpu_check.run(ctx, ["sleep", "30"], "sleep.log", 1)
    with pytest.raises(gpu_check.PartFailed, match="failed \\(exit 3"):
        gpu_check.run(ctx, ["bash", "-c", "echo broken; exit 3"], "exit.log", 10)


@pytest.mark.slow
def test_the_resume_part_rehearsed_on_the_cpu(tmp_path, capsys):
    """The SIGTERM / resume part, run on the CPU (rehearsal): the stopped and resumed run equals the unbroken one."""
    gpu_check.main(rehearsal=True, only="resume", out=str(tmp_path), budget_s=300)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["device"] == "CPU rehearsal, not GPU figures"
    (part,) = summary["parts"]
    assert part["status"] == "ok", part
    assert part["figures"] == {"stopped_by_sigterm": True, "max_abs_diff_resumed_vs_unbroken": 0.0,
                               "max_abs_diff_two_unbroken_runs": 0.0}


@pytest.mark.slow
def test_the_on_policy_part_rehearsed_on_the_cpu(tmp_path):
    """The on-policy timing part, run on the CPU (rehearsal): its table and JSON figures come back."""
    gpu_check.main(rehearsal=True, only="on_policy", out=str(tmp_path), budget_s=300)
    (part,) = json.loads((tmp_path / "summary.json").read_text())["parts"]
    assert part["status"] == "ok", part
    assert "| on-policy + CE |" in part["table"] and "| off-policy |" in part["table"]
    figures = json.loads((tmp_path / "bench_on_policy.json").read_text())
    assert figures["device"] == "cpu" and set(figures["modes"]) == {"off-policy", "on-policy + CE"}
    assert figures["modes"]["on-policy + CE"]["generation"] > 0 and figures["modes"]["off-policy"]["generation"] == 0
