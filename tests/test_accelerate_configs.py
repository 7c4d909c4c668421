"""Every shipped Accelerate launch config is one Accelerate itself accepts."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "accelerate_configs").glob("*.yaml"))
EXPECTED = {"cpu_ddp", "single_gpu", "multi_gpu", "multi_node", "fsdp", "deepspeed_zero2",
            "deepspeed_zero3"}


def test_the_documented_configs_are_shipped():
    assert {p.stem for p in CONFIGS} == EXPECTED


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_in_accelerate(path: Path):
    config = load_config_from_file(str(path))
    assert config.num_processes >= 1 and config.mixed_precision in ("no", "bf16", "fp16")
    if path.stem == "fsdp":
        assert config.fsdp_config["fsdp_reshard_after_forward"] is True  # full shard
    if path.stem.startswith("deepspeed"):
        assert config.deepspeed_config["zero_stage"] == int(path.stem[-1])
