"""torchrun: two processes train an image-input method with gradient accumulation exactly like one, and
print their logs and results once."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from helpers import free_port, run_two_processes_and_one

pytestmark = pytest.mark.distributed


def test_two_processes_with_grad_accum_match_one_and_print_once(tiny_config, colour_data, tmp_path):
    # LoRA on images (the DataLoader path, DDP's no_sync during accumulation); no dropout and a deterministic
    # crop, so both runs see the same numbers. 27 images, batch 8, accumulation 2: the last group has one
    # batch of 3 images, split 2 + 1 between the processes. SGD: Adam divides by the square root of the
    # gradients' second moment, which turns the all-reduce's rounding in LoRA's near-zero early gradients
    # (B starts at 0) into full-size steps.
    args = ["finetune", "--data", str(colour_data), "--model-config", tiny_config, "--method", "lora",
            "--lora-dropout", "0", "--epochs", "2", "--optimizer", "sgd", "--lr", "0.05", "--batch-size", "8", "--grad-accum", "2",
            "--set", "aug_crop_scale=[1.0,1.0]", "--set", "aug_hflip=false"]
    two, _ = run_two_processes_and_one(args, tmp_path)

    m2 = json.loads((tmp_path / "two/metrics.json").read_text())
    m1 = json.loads((tmp_path / "one/metrics.json").read_text())
    assert (m2["processes"], m1["processes"]) == (2, 1)
    assert m2["train"]["images_seen"] == m1["train"]["images_seen"] == 2 * 27
    assert m2["test"]["per_class"] == m1["test"]["per_class"]
    assert m2["test"]["nll"] == pytest.approx(m1["test"]["nll"], abs=1e-5)
    assert [h["loss"] for h in m2["train"]["history"]] == pytest.approx([h["loss"] for h in m1["train"]["history"]], abs=1e-6)
    for name in ("best/method.safetensors", "last/trainable.safetensors"):
        w2, w1 = load_file(str(tmp_path / "two/checkpoints" / name)), load_file(str(tmp_path / "one/checkpoints" / name))
        assert w2.keys() == w1.keys()
        for key in w1:
            assert torch.allclose(w2[key], w1[key], atol=1e-6), (name, key, (w2[key] - w1[key]).abs().max())

    # results once on stdout (the console log skips them), progress and warnings once on stderr
    assert two.stdout.count("lora test: top-1") == 1 and two.stdout.count("run folder:") == 1
    assert two.stdout.count("zero-shot test: top-1") == 1
    assert len(re.findall(r"epoch 2/2 loss", two.stderr)) == 1
    assert two.stderr.count("randomly initialised") == 1
    assert "top-1" not in two.stderr


def _cache_features_in_two_processes(rank: int, port: int, tiny_config: str, data_dir: str, cache_dir: str) -> None:
    """One of two gloo processes asking the feature cache for the same split; rank 1 starts late."""
    import os
    import time
    from datetime import timedelta

    from accelerate import Accelerator, InitProcessGroupKwargs

    from cliptune.data.folders import eval_transform, load_imagefolder
    from cliptune.models.features import image_features
    from cliptune.models.loading import load_model

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    # a short timeout: a barrier one process skips fails the test instead of hanging it
    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=20))])
    model = load_model(model_config=tiny_config)
    split = load_imagefolder(data_dir).splits["test"]
    if rank == 1:
        time.sleep(3)  # the main process has written the cache file before this one looks
    features = image_features(model, split, eval_transform(model.image_size, model.mean, model.std),
                              cache_dir=cache_dir, accelerator=accelerator)
    accelerator.wait_for_everyone()  # the same number of collectives in both processes, or this times out
    assert features.shape[0] == len(split)
    torch.distributed.destroy_process_group()


def test_a_late_process_joins_the_feature_cache_barrier(tiny_config, colour_data, tmp_path):
    # a process that looked for the cache file only after the main process had written it used to skip the
    # barrier the main process waited at: under CI load, a torchrun run hung in its zero-shot phase
    torch.multiprocessing.spawn(_cache_features_in_two_processes, nprocs=2,
                                args=(free_port(), tiny_config, str(colour_data), str(tmp_path / "cache")))
    assert len(list((tmp_path / "cache").glob("features-*.safetensors"))) == 1


@pytest.mark.distributed
def test_accelerate_launch_starts_the_same_two_process_run(tiny_config, colour_data, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (docs/engine.md) on a CPU-only machine: two gloo processes
    that train and score as one process does (CoOp on cached features, the feature path of the engine)."""
    args = ["finetune", "--data", str(colour_data), "--model-config", tiny_config, "--method", "coop", "--n-ctx", "2",
            "--epochs", "2", "--lr", "0.05", "--batch-size", "8"]
    run_two_processes_and_one(args, tmp_path, quiet_two=True, launcher="accelerate")
    m2 = json.loads((tmp_path / "two/metrics.json").read_text())
    m1 = json.loads((tmp_path / "one/metrics.json").read_text())
    assert (m2["processes"], m1["processes"]) == (2, 1)
    assert [h["loss"] for h in m2["train"]["history"]] == pytest.approx([h["loss"] for h in m1["train"]["history"]], abs=1e-5)
    assert m2["test"]["top1"] == m1["test"]["top1"]
    w2, w1 = (load_file(str(tmp_path / run / "checkpoints/best/method.safetensors")) for run in ("two", "one"))
    assert all(torch.allclose(w2[k], w1[k], atol=1e-5) for k in w1)
