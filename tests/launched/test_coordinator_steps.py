"""The ZeRO-3 parameter coordinator sees one step per decoder forward: its recorded module trace completes,
so it can prefetch. (The losses call model.base_model directly; DeepSpeed resets only when the forward
of the whole model starts, and without a reset the trace never completes.) One ZeRO-3 rank in a child
process, so the test's own process keeps no process group."""

import json
import subprocess
import sys

from launching import REPO, cpu_env

SCRIPT = """
import json, sys
import torch
from adamix_ds import MixtureConfig, causal_lm_losses, inject_mixtures
from adamix_ds import distributed
from adamix_ds.arguments import ModelArguments, TrainArguments
from adamix_ds.distributed.ds_config import load_ds_config, resolve_ds_config
from adamix_ds.distributed.sharded_base import load_base

distributed.init_process_group()
ds_config, _ = resolve_ds_config(load_ds_config("ds_configs/zero3.json"), TrainArguments(), 1, steps_for=lambda p: 1)
base = load_base(ModelArguments(model_name_or_path="tiny:llama"), ds_config, vocab_size=128, seed=0)
coordinator = next(k for k in base._keepalive if hasattr(k, "get_param_coordinator")).get_param_coordinator()
mixtures = inject_mixtures(base.model, MixtureConfig(method="lora"))
ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
states = []
for step in range(3):
    mixtures.router.step = step
    causal_lm_losses(base.model, ids, ids, router=mixtures.router).lm.backward()
    states.append([coordinator.is_record_trace(), coordinator.is_complete_trace(), coordinator.is_invalid_trace()])
print("STATES", json.dumps(states))
distributed.destroy_process_group()
"""


def test_each_decoder_forward_is_one_coordinator_step():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("STATES"))
    states = json.loads(line.split(" ", 1)[1])
    # After the first forward+backward the trace was being recorded; from the second step on it is complete.
    assert states[0] == [True, False, False]
    assert states[1] == [False, True, False] and states[2] == [False, True, False]
