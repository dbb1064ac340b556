"""keep_freed_memory: a training step's activation buffers stop costing page faults."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

STEPS = """
import resource, sys, torch
from transformers import BertConfig, BertForSequenceClassification
from peftlab.runtime.heap import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory() and keep_freed_memory()  # idempotent
torch.manual_seed(0)
cfg = BertConfig(vocab_size=100, hidden_size=384, num_hidden_layers=2, num_attention_heads=12,
                 intermediate_size=1536)
model = BertForSequenceClassification(cfg).to(torch.bfloat16).train()
x, y = torch.randint(0, 100, (32, 64)), torch.randint(0, 2, (32,))
def step():
    model(input_ids=x, labels=y).loss.backward()
    model.zero_grad(set_to_none=True)
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 8)
"""


def faults_per_step(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(STEPS), mode], check=True,
                         capture_output=True, text=True, timeout=300)
    return float(out.stdout.strip().splitlines()[-1])


def test_a_bert_step_stops_page_faulting_once_freed_memory_is_kept():
    """A 2-layer BERT step at MiniLM's width, batch 32 x 64 in bf16: glibc's defaults hand
    the few-MB buffers back to the kernel every step (~15,000 faults measured)."""
    default, kept = faults_per_step("default"), faults_per_step("keep")
    assert default > 2000, f"glibc's defaults no longer fault here ({default}/step): is the lever still needed?"
    assert kept < default / 10, (kept, default)
