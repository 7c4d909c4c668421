"""CPU training keeps its freed step buffers instead of page-faulting them back every step."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch

from hftrain.allocator import keep_freed_heap_memory

# The PTB recipe's LSTM (2 x 200, dropout 0.2) with a 4,000-word vocabulary, so its logits are
# 11 MiB (20 x 35 tokens): ten warm-up steps, then the median minor page faults of 20 more.
# Under glibc's defaults that median measured 1,351-12,393 faults per step; kept, 0.
STEP_FAULTS = """
import resource, statistics
import torch
from hftrain.allocator import keep_freed_heap_memory
from hftrain.evaluation import token_nll
from hftrain.models.recurrent import RecurrentForCausalLM, RecurrentLMConfig

assert keep_freed_heap_memory(torch.device("cpu"))
torch.manual_seed(0)
config = RecurrentLMConfig(vocab_size=4000, embedding_size=200, hidden_size=200, num_layers=2,
                           dropout=0.2, embedding_dropout=0.2, output_dropout=0.2)
model = RecurrentForCausalLM(config)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
ids = torch.randint(0, 4000, (20, 35))

def faults_of_one_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    token_nll(model(input_ids=ids).logits, ids).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

for _ in range(10):
    faults_of_one_step()
print(statistics.median(faults_of_one_step() for _ in range(20)))
"""

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc malloc")


@glibc_only
def test_training_steps_reuse_their_memory():
    # A bare environment: a MALLOC_*_ or LD_PRELOAD of the caller's would (rightly) disable it.
    result = subprocess.run([sys.executable, "-c", STEP_FAULTS], capture_output=True, text=True,
                            check=True, env={"PATH": "", "HF_HUB_OFFLINE": "1"})
    # An 11 MiB buffer is ~2,700 pages: a step that re-faults even one of its buffers shows it.
    assert float(result.stdout.split()[-1]) < 100


@glibc_only
@pytest.mark.parametrize("name, value", [("MALLOC_TRIM_THRESHOLD_", "0"),
                                         ("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")])
def test_the_users_own_allocator_settings_win(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert keep_freed_heap_memory(torch.device("cpu")) is False


def test_other_devices_are_left_alone():
    assert keep_freed_heap_memory(torch.device("meta")) is False
