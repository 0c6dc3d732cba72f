"""Fast start: no torch for --help and recipes; an unreachable hub fails in seconds with the offline line."""

import json
import os
import socket
import subprocess
import sys
import threading

import pytest

OFFLINE_LINE = ("error: could not download the weights for ViT-B-32 (openai) (offline or unreachable, and not in the "
                "local cache); download them on a connected machine, pass a local checkpoint with --pretrained FILE "
                "(plus --model-config FILE for a custom architecture), or pick another model with --model NAME "
                "--pretrained TAG_OR_FILE")


def test_help_and_recipes_do_not_import_torch():
    """Command help (method flags included) and recipe listing answer without torch."""
    program = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from cliptune.cli import cli\n"
        "for args in (['--help'], ['recipes', 'list'], ['recipes', 'show', 'demo'], ['finetune', '--help'],\n"
        "             ['continual', '--help'], ['sweep', '--help']):\n"
        "    result = CliRunner().invoke(cli, args)\n"
        "    assert result.exit_code == 0, result.output\n"
        "import cliptune\n"
        "print(sorted(m for m in ('torch', 'open_clip', 'accelerate', 'peft', 'torchvision') if m in sys.modules))\n"
        "cliptune.load_model\n"  # the lazy export still resolves
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[:2] == ["[]", "True"]


class Blackhole:
    """A loopback server that accepts connections and never answers (a hub that hangs)."""

    def __init__(self):
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.connections = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.connections.append(self.server.accept()[0])
            except OSError:
                return

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server.getsockname()[1]}"

    def close(self):
        for connection in self.connections:
            connection.close()
        self.server.close()


@pytest.mark.slow
def test_unreachable_hub_fails_fast_with_the_offline_line(tmp_path):
    hub = Blackhole()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), NO_PROXY="*", no_proxy="*", OMP_NUM_THREADS="1")
    program = (
        "import time, sys\n"
        "import cliptune.models.loading as models\n"
        "from cliptune.core.errors import CliptuneError\n"
        "began = time.perf_counter()\n"
        "try:\n"
        "    models.load_model('ViT-B-32', 'openai')\n"
        "except CliptuneError as exc:\n"
        "    print(f'{time.perf_counter() - began:.1f}')\n"
        "    print('error: ' + str(exc))\n"
    )
    try:
        result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env, timeout=240)
    finally:
        hub.close()
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2, result.stderr[-2000:]
    assert lines[1] == OFFLINE_LINE  # the same line as with HF_HUB_OFFLINE=1
    assert len(hub.connections) == 1  # one probe, no retries
    # the probe waits 5 s; huggingface_hub's own retries took minutes against this server
    assert float(lines[0]) < 5 + 15, f"took {lines[0]} s"


def test_the_shipped_method_flag_table_matches_the_method_registry():
    from cliptune.config.method_flags import method_flags
    from cliptune.methods import flag_table

    assert method_flags() == json.loads(json.dumps(flag_table())), \
        "cliptune/config/method_flags.json is stale: run python scripts/write_method_flags.py"
