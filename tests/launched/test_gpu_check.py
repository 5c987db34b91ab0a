"""The GPU check script in its CPU mode: every part runs in its own process and reports, so the script is known
to work before a GPU is available (the GPU run itself: docs/gpu-check.md)."""

import json
import subprocess
import sys

from launching import REPO, cpu_env


def test_the_gpu_check_runs_every_part_in_cpu_mode(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(out), "--cpu"],
                          cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert {p: r["status"] for p, r in summary["parts"].items()} == {
        "correctness": "ok", "benchmark": "ok", "micro_batch": "ok", "experts": "ok", "real_model": "ok"}
    checks = json.loads((out / "correctness.json").read_text())["checks"]
    assert {"bf16 adamix-lora", "bf16 moa-soft", "merge and PEFT round trip (bf16)", "attention sdpa vs eager (bf16)",
            "train, resume, export"} <= set(checks)
    assert all(c["ok"] for c in checks.values())
    assert checks["train, resume, export"]["resumed_max_loss_difference"] == 0.0  # exact on the CPU
    benchmark = json.loads((out / "benchmark.json").read_text())
    assert set(benchmark["rows"]) == set("abcdegh")
    assert benchmark["d_over_b"] == benchmark["rows"]["d"]["median_s"] / benchmark["rows"]["b"]["median_s"]
    micro = json.loads((out / "micro_batch.json").read_text())
    assert sorted(micro["d_over_b"], key=int) == ["1", "2", "4"]
    experts = json.loads((out / "experts.json").read_text())
    assert sorted(experts["rows"]) == sorted(f"c@experts={m}" for m in (1, 2, 4, 8))
    real = json.loads((out / "real_model.json").read_text())
    assert set(real["rows"]) == set("pbcd") and real["b_over_p"] == real["rows"]["b"]["median_s"] / real["rows"]["p"]["median_s"]
    assert "| correctness | ok |" in (out / "summary.md").read_text()
