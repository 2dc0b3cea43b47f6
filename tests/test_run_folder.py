"""A run folder's life: another run's folder refused, a finished run reported, the command that
continues a run (pasted as is), and no hint when there is nothing to continue."""

from __future__ import annotations

import json
import shlex

from fedprune.aggregator.run_folder import interrupted, refusal, resume_command

TASK = """
[federation]
rounds = 4
wait_for_devices_s = 1
"""


def _run_with_checkpoint(folder, rounds=2):
    (folder / "checkpoints").mkdir(parents=True)
    for r in range(1, rounds + 1):
        (folder / "checkpoints" / f"round-{r:05d}.npz").write_bytes(b"")
        with open(folder / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"round": r}) + "\n")
    return folder


def test_a_folder_with_a_run_is_refused_without_resume_and_one_without_is_not(tmp_path):
    """Running fedprune-simulate twice into one --run-dir appended to the old record: metrics.jsonl
    held rounds 1-4 twice and the report said "after 8 rounds" for a 4-round task."""
    run = _run_with_checkpoint(tmp_path / "run")
    code, message = refusal(run, resume=False)
    assert code == 2 and message == (f"error: {run} already holds a run (metrics.jsonl, checkpoints/ (round 2)); "
                                     "continue it with --resume, or give another --run-dir")
    assert refusal(run, resume=True) is None
    started = tmp_path / "started"  # stopped before its first round: only task.json
    started.mkdir()
    (started / "task.json").write_text("{}")
    assert refusal(started, resume=False) is None
    code, message = refusal(started, resume=True)
    assert code == 2 and "no completed round to continue from" in message and "without --resume" in message
    assert refusal(tmp_path / "new", resume=False) is None


def test_resume_on_a_finished_run_says_so_and_exits_0(tmp_path):
    run = _run_with_checkpoint(tmp_path / "run", rounds=4)
    (run / "summary.json").write_text(json.dumps({"rounds": 4, "final_accuracy": 0.9612}))
    assert refusal(run, resume=True) == (0, f"{run} finished already: 4 rounds, final accuracy 0.9612 "
                                            "(summary.json); nothing to resume")


def test_the_hint_continues_the_run_with_every_flag_and_none_is_offered_before_round_1(tmp_path):
    run = _run_with_checkpoint(tmp_path / "my run")
    argv = ["--task", "t.toml", "--port", "1884", "--host", "0.0.0.0", "--run-dir=old", "--status-port", "8080"]
    command = resume_command("fedprune-aggregator", argv, run)
    assert shlex.split(command) == ["fedprune-aggregator", "--task", "t.toml", "--port", "1884", "--host", "0.0.0.0",
                                    "--status-port", "8080", "--run-dir", str(run), "--resume"]
    again = resume_command("fedprune-aggregator", shlex.split(command)[1:], run)
    assert again == command  # pasting the hint and stopping again gives the same hint
    assert interrupted("fedprune-simulate", argv, run).endswith("continue with:\n  " +
                                                                resume_command("fedprune-simulate", argv, run))
    assert interrupted("fedprune-aggregator", argv, tmp_path / "nothing").startswith(
        "interrupted before any round completed: nothing to resume")


def test_both_commands_refuse_before_starting_anything(tmp_path, capsys):
    from fedprune.aggregator.cli import main as aggregator_main
    from fedprune.simulation.cli import main as simulate_main

    task = tmp_path / "task.toml"
    task.write_text(TASK)
    run = _run_with_checkpoint(tmp_path / "run")
    for main in (aggregator_main, simulate_main):
        assert main(["--task", str(task), "--run-dir", str(run)]) == 2
        assert "already holds a run" in capsys.readouterr().err
    (run / "summary.json").write_text(json.dumps({"rounds": 2, "final_accuracy": 0.5}))
    for main in (aggregator_main, simulate_main):
        assert main(["--task", str(task), "--run-dir", str(run), "--resume"]) == 0
        assert "finished already: 2 rounds" in capsys.readouterr().out
