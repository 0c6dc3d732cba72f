"""`cliptune compare`: the grid, its summary (checked against the cells' own metrics), resuming, failures."""

import json
import shutil

import pytest
from click.testing import CliRunner

from cliptune.commands import compare as compare_module
from cliptune.cli import cli
from cliptune.core.cachedir import user_cache_dir

METHODS, SHOTS, SEEDS = ("linear-probe", "coop", "lora"), (1, 2), (1, 2)
FINISHED = [(m, k, s) for m in METHODS[:2] for k in SHOTS for s in SEEDS]  # lora fails: lora_r=0 below


def grid_args(tiny_config, data, out, *extra):
    return ["compare", "--data", str(data), "--model-config", tiny_config, "--methods", ",".join(METHODS),
            "--shots", "1,2", "--seeds", "1,2", "--epochs", "1", "--batch-size", "8",
            "--set", "lora.lora_r=0", *extra, "--out", str(out)]


def cell_name(method, shots, seed):
    return f"{method}-{shots}shot-seed{seed}"


def cell_metrics(out, method, shots, seed):
    return json.loads((out / "cells" / cell_name(method, shots, seed) / "metrics.json").read_text())


@pytest.fixture(scope="module")
def grid(tmp_path_factory, tiny_config, colour_data):
    """One grid run through the CLI: 2 methods x 2 shots x 2 seeds that finish, and 4 lora cells that fail."""
    out = tmp_path_factory.mktemp("compare") / "grid"
    result = CliRunner().invoke(cli, grid_args(tiny_config, colour_data, out))
    assert result.exit_code == 0, result.output
    return out, result.output


def test_grid_summary_matches_the_cells(grid):
    out, output = grid
    report = json.loads((out / "compare.json").read_text())
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [(c["method"], c["shots"], c["seed"]) for c in report["cells"]] == [
        (m, k, s) for m in METHODS for k in SHOTS for s in SEEDS]
    failed = [c for c in report["cells"] if c["status"] == "failed"]
    assert [c["method"] for c in failed] == ["lora"] * 4 and all("lora_r" in c["error"] for c in failed)
    assert all("\n" not in c["error"] for c in failed)
    # a failed cell left no run folder claiming to be one; finished cells share OUT/cache and have none of their own
    assert all(not (out / c["run"] / "metrics.json").exists() for c in failed)
    assert any((user_cache_dir() / "features").glob("features-*.safetensors"))  # the cache every run shares
    assert all(not (out / "cells" / cell_name(*cell) / "cache").exists() for cell in FINISHED)

    summary = {(s["method"], s["shots"]): s for s in report["summary"]}
    md = (out / "compare.md").read_text()
    for method in METHODS[:2]:
        for k in SHOTS:
            a, b = (cell_metrics(out, method, k, s) for s in SEEDS)
            mean, std = (a["test"]["top1"] + b["test"]["top1"]) / 2, abs(a["test"]["top1"] - b["test"]["top1"]) / 2
            seconds = (a["train"]["seconds"] + b["train"]["seconds"]) / 2
            entry = summary[(method, k)]
            assert entry["top1_mean"] == pytest.approx(mean) and entry["top1_std"] == pytest.approx(std)
            assert entry["train_seconds_mean"] == pytest.approx(seconds)
            assert (entry["finished"], entry["failed"]) == (2, 0)
            assert f"{100 * mean:.1f} ± {100 * std:.1f}" in md
    assert summary[("lora", 1)]["top1_mean"] is None and summary[("lora", 1)]["failed"] == 2

    for k, zeroshot in zip(SHOTS, report["zeroshot"]):
        z1, z2 = (cell_metrics(out, "coop", k, s)["zeroshot"]["top1"] for s in SEEDS)
        assert zeroshot["shots"] == k and zeroshot["seeds"] == 2
        assert zeroshot["top1_mean"] == pytest.approx((z1 + z2) / 2)
        assert zeroshot["top1_std"] == pytest.approx(abs(z1 - z2) / 2)

    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[0] == "| method | 1 shot | 2 shots |" and rows[1].startswith("| zero-shot |")
    assert rows[4] == "| lora | failed | failed |"
    for column in (1, 2):  # the bold entry of each column is its highest mean as shown
        cells = [row.split(" | ")[column].strip(" |") for row in rows[1:4]]
        means = [float(cell.strip("*").split(" ± ")[0]) for cell in cells]
        assert [cell.startswith("**") for cell in cells] == [m == max(means) for m in means]
    failures = md.split("Failed cells:")[1].strip().splitlines()
    assert [line.split("`")[1] for line in failures] == [c["run"] for c in failed]
    assert all("lora_r" in line for line in failures)
    assert md in output  # the table is printed at the end


def test_rerun_skips_finished_cells_and_resumes_interrupted_ones(grid, tiny_config, colour_data, tmp_path, monkeypatch):
    source, _ = grid
    out = tmp_path / "grid"
    shutil.copytree(source, out)
    before = json.loads((out / "compare.json").read_text())
    interrupted, never_trained = ("coop", 2, 1), ("linear-probe", 1, 2)
    (out / "cells" / cell_name(*interrupted) / "metrics.json").unlink()  # stopped after its last checkpoint
    broken = out / "cells" / cell_name(*never_trained)
    shutil.rmtree(broken)
    broken.mkdir()
    (broken / "log.txt").write_text("interrupted before config.yaml was written\n")
    untouched = {cell: (out / "cells" / cell_name(*cell) / "metrics.json").stat().st_mtime_ns
                 for cell in FINISHED if cell not in (interrupted, never_trained)}

    calls = {}
    finetune = compare_module.api.finetune

    def counting_finetune(config, run_dir, **kwargs):
        calls[run_dir.name] = kwargs["resume"]
        return finetune(config, run_dir, **kwargs)

    monkeypatch.setattr(compare_module.api, "finetune", counting_finetune)
    report = compare_module.compare(out, METHODS, SHOTS, SEEDS, data=colour_data, options={"model_config": tiny_config,
                                    "epochs": 1, "batch_size": 8}, set_values=["lora.lora_r=0"])
    trained = {name: resume for name, resume in calls.items() if not name.startswith("lora-")}
    assert trained == {cell_name(*interrupted): True, cell_name(*never_trained): False}
    assert {cell: (out / "cells" / cell_name(*cell) / "metrics.json").stat().st_mtime_ns for cell in untouched} == untouched
    reused = {(c["method"], c["shots"], c["seed"]) for c in report["cells"] if c.get("reused")}
    assert reused == set(untouched)
    # the resumed cell evaluates the same best checkpoint; the restarted one retrains from the same seed
    assert [c.get("top1") for c in report["cells"]] == [c.get("top1") for c in before["cells"]]
    accuracy = ("method", "shots", "top1_mean", "top1_std", "finished", "failed")  # not seconds: they vary
    assert [{k: s[k] for k in accuracy} for s in report["summary"]] == [{k: s[k] for k in accuracy} for s in before["summary"]]
    assert report["zeroshot"] == before["zeroshot"] and (out / "cells" / cell_name(*never_trained) / "config.yaml").is_file()

    # other settings in the same folder are refused, not mixed into the table
    result = CliRunner().invoke(cli, grid_args(tiny_config, colour_data, out)[:-2] + ["--lr", "0.5", "--out", str(out)])
    assert result.exit_code != 0 and "finished with other settings (lr: 0.001, now 0.5)" in result.output


@pytest.mark.parametrize("change, message", [
    (["--methods", "linear-probe,nope"], "unknown method 'nope' in --methods"),
    (["--shots", "1,0"], "--shots must be positive integers, got 0"),
    (["--shots", "1,x"], "--shots expects positive integers, got 'x'"),
    (["--seeds", "1,1"], "--seeds lists 1 more than once"),
    (["--methods", "coop,"], "--methods expects a comma list without empty entries"),
    (["--steps", "0"], "--steps must be positive integers, got 0"),
    (["--data", "/nonexistent/images"], "--data /nonexistent/images: no such folder or file"),
    (["--set", "seed=3"], "the grid sets seed; use --methods, --shots and --seeds instead"),
    (["--set", "no_such_key=1"], "unknown config key 'no_such_key'"),
    (["--pretrained", "/nonexistent/weights.safetensors"], "checkpoint file not found"),
])
def test_bad_options_are_refused_before_any_folder(tiny_config, colour_data, tmp_path, change, message):
    args = ["compare", "--data", str(colour_data), "--model-config", tiny_config, "--methods", "linear-probe",
            "--shots", "1", "--out", str(tmp_path / "out")]
    for flag, value in zip(change[::2], change[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args[-2:-2] = [flag, value]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0
    assert result.output.startswith("error: ") and message in result.output and "Traceback" not in result.output
    assert result.output.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_summary_of_partial_groups():
    """Hand-made cells: a group with one failed seed, zero-shot averaged per seed first, then over seeds."""
    def cell(method, seed, top1, zeroshot):
        return {"method": method, "shots": 4, "seed": seed, "run": f"cells/{cell_name(method, 4, seed)}",
                "status": "finished", "top1": top1, "zeroshot_top1": zeroshot, "train_seconds": 2.0 * seed,
                "score": top1, "zeroshot_score": zeroshot}  # --metric top1

    cells = [cell("coop", 1, 0.6, 0.5), cell("coop", 2, 0.9, 0.7), cell("lora", 1, 0.8, 0.5),
             {"method": "lora", "shots": 4, "seed": 2, "run": "cells/lora-4shot-seed2", "status": "failed", "error": "boom"}]
    result = {"data": "d", "metric": "top1", "methods": ["coop", "lora"], "shots": [4], "seeds": [1, 2], "cells": cells,
              **compare_module.summarise(cells, ["coop", "lora"], [4])}
    coop, lora = result["summary"]
    assert (coop["top1_mean"], coop["top1_std"], coop["train_seconds_mean"]) == pytest.approx((0.75, 0.15, 3.0))
    assert (lora["top1_mean"], lora["top1_std"], lora["finished"], lora["failed"]) == pytest.approx((0.8, 0.0, 1, 1))
    # seed 1: both cells saw 0.5; seed 2: only coop finished (0.7): seeds weigh equally, not cells
    assert (result["zeroshot"][0]["top1_mean"], result["zeroshot"][0]["top1_std"]) == pytest.approx((0.6, 0.1))
    md = compare_module.render_markdown(result)
    assert "| lora | **80.0 ± 0.0 (1/2 seeds)** |" in md and "| coop | 75.0 ± 15.0 |" in md
    assert "| zero-shot | 60.0 ± 10.0 |" in md and "- `cells/lora-4shot-seed2`: boom" in md
    assert md.startswith("Test top-1 (%) on d")
    # --metric macro_f1: the table ranks and shows that score; top-1 stays in compare.json
    for c, f1 in zip(cells[:3], (0.5, 0.7, 0.4)):
        c.update(score=f1, zeroshot_score=0.3)
    result.update(metric="macro_f1", **compare_module.summarise(cells, ["coop", "lora"], [4]))
    md = compare_module.render_markdown(result)
    assert md.startswith("Test macro-F1 (%) on d") and "| coop | **60.0 ± 10.0** |" in md and "| lora | 40.0 ± 0.0 (1/2 seeds) |" in md
    assert result["summary"][0]["top1_mean"] == pytest.approx(0.75)
