"""Run reports: written by every run, numbers from the stored predictions, self-contained, render in a browser."""

import json
import re
import shutil
import subprocess

import pytest
import torch
from click.testing import CliRunner

from cliptune.cli import cli
from cliptune.core.metrics import classification_metrics, expected_calibration_error
from cliptune.deploy.report import REPORT, confusion_matrix, load_predictions, predictions_path, write_run_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def runs(tiny_config, split_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("report-runs")
    result = run("finetune", "--data", split_data, "--model-config", tiny_config, "--method", "coop", "--n-ctx", 2,
                 "--epochs", 3, "--lr", 0.05, "--batch-size", 8, "--out", root / "coop")
    assert result.exit_code == 0, result.output
    result = run("zeroshot", "--data", split_data, "--model-config", tiny_config, "--out", root / "zs")
    assert result.exit_code == 0, result.output
    return {"coop": root / "coop", "zeroshot": root / "zs"}


def images_of(page: str) -> list:
    return re.findall(r'<img [^>]*src="([^"]*)"', page)


@pytest.mark.parametrize("name", ["coop", "zeroshot"])
def test_every_run_writes_a_self_contained_report(runs, name):
    page = (runs[name] / REPORT).read_text()
    sources = images_of(page)
    # confusion matrix, reliability, per-class (+ training curves for a trained run), all embedded PNGs
    assert len(sources) == (4 if name == "coop" else 3)
    assert all(src.startswith("data:image/png;base64,") for src in sources)
    assert "<script" not in page and "http://" not in page and "https://" not in page
    metrics = json.loads((runs[name] / "metrics.json").read_text())
    assert f"{100 * metrics['test']['top1']:.1f}%" in page and f"{metrics['test']['ece']:.4f}" in page
    assert "Resolved config" in page and "n_ctx: 2" in page or name == "zeroshot"


@pytest.mark.parametrize("name", ["coop", "zeroshot"])
def test_stored_predictions_are_the_evaluated_ones(runs, name):
    metrics = json.loads((runs[name] / "metrics.json").read_text())
    logits, labels = load_predictions(runs[name], "test")
    again = classification_metrics(logits, labels, metrics["classes"])
    assert again["top1"] == metrics["test"]["top1"] and again["per_class"] == metrics["test"]["per_class"]
    assert expected_calibration_error(logits.softmax(1), labels) == pytest.approx(metrics["test"]["ece"], abs=1e-6)


def test_confusion_matrix_counts():
    logits = torch.tensor([[3.0, 0, 0], [0, 3, 0], [3, 0, 0], [0, 0, 3], [0, 3, 0]])
    labels = torch.tensor([0, 1, 1, 2, 2])
    expected = torch.zeros(3, 3, dtype=torch.long)
    for y, p in zip(labels.tolist(), logits.argmax(1).tolist()):
        expected[y, p] += 1
    assert torch.equal(confusion_matrix(logits, labels, 3), expected)
    assert expected.tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]


def test_report_of_a_run_without_stored_predictions_recomputes_them(runs, tmp_path):
    copy = tmp_path / "coop"
    shutil.copytree(runs["coop"], copy)
    stored = load_predictions(copy, "test")
    predictions_path(copy, "test").unlink()
    logits, labels = load_predictions(copy, "test")  # through cliptune.load on the run's data
    assert torch.equal(labels, stored[1]) and (logits - stored[0]).abs().max() < 1e-4
    (copy / REPORT).unlink()
    write_run_report(copy)
    assert len(images_of((copy / REPORT).read_text())) == 4


def test_report_command_compares_runs(runs, tmp_path):
    out = tmp_path / "compare.html"
    result = run("report", runs["coop"], runs["zeroshot"], "--output", out)
    assert result.exit_code == 0, result.output
    page = out.read_text()
    rows = re.findall(r"<tr>(.*?)</tr>", page)
    cells = [re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row) for row in rows[:3]]
    assert cells[0][:4] == ["run", "method", "shots", "top-1"]
    for row, name in zip(cells[1:], ["coop", "zeroshot"]):
        metrics = json.loads((runs[name] / "metrics.json").read_text())
        assert row[1] == name and row[3] == f"{100 * metrics['test']['top1']:.1f}%"
        assert row[8] == f"{metrics['test']['ece']:.4f}"
    assert all(src.startswith("data:image/png;base64,") for src in images_of(page))

    bad = run("report", tmp_path, "--output", out)
    assert bad.exit_code != 0 and "not a finished run" in bad.output and "Traceback" not in bad.output
    bad = run("report", runs["coop"], "--output", tmp_path / "compare.txt")
    assert bad.exit_code != 0 and "must be an .html file" in bad.output


# Injected first in <head>: records errors (scripts, console, failed resources) and, once loaded, whether
# every image decoded; the result lands in the DOM that --dump-dom prints.
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || (e.target && e.target.src) || e)), true);
const originalError = console.error;
console.error = (...args) => { window.__errors.push(args.join(' ')); originalError(...args); };
window.addEventListener('load', () => {
  const images = Array.from(document.images);
  const result = {images: images.length, decoded: images.filter(i => i.complete && i.naturalWidth > 0).length,
                  errors: window.__errors};
  const out = document.createElement('pre'); out.id = 'probe-result'; out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
});
</script>"""


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed")
@pytest.mark.parametrize("which", ["coop", "compare"])
def test_report_renders_in_a_real_browser(runs, which, tmp_path):
    if which == "compare":
        source = tmp_path / "compare.html"
        assert run("report", runs["coop"], runs["zeroshot"], "--output", source).exit_code == 0
    else:
        source = runs["coop"] / REPORT
    page = source.read_text()
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("<head>", "<head>" + PROBE, 1))
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
               "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="probe-result">(.*?)</pre>', done.stdout)
    assert found, done.stderr[-2000:]
    result = json.loads(found.group(1).replace("&quot;", '"'))
    assert result["images"] == len(images_of(page)) > 0
    assert result["decoded"] == result["images"]
    assert result["errors"] == []
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line]
    assert console == [], console
