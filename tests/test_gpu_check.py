"""bench/gpu_check.py's own code path, on the CPU: ``--smoke`` trains tiny SD 1.x and SDXL models through the real
trainer (TrainConfig -> prepare_run -> Trainer) in fp32 for 2 steps and writes the report the GPU run writes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_trains_both_families_with_finite_losses(tmp_path):
    out = tmp_path / "gpu_check.json"
    started = time.perf_counter()
    process = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--smoke", "--out", str(out)],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - started
    assert process.returncode == 0, process.stdout + process.stderr
    assert elapsed < 60, f"the smoke run took {elapsed:.0f} s"
    report = json.loads(out.read_text())
    assert report["smoke"] is True and report["steps"] == 2
    assert {"python", "torch", "diffusers", "transformers", "peft"} <= set(report["machine"])
    cases = {c["family"]: c for c in report["cases"]}
    assert set(cases) == {"tiny-sd1", "tiny-sdxl"}
    for family, case in cases.items():
        assert "error" not in case, case
        assert case["status"] == "finished" and case["steps_done"] == 2, case
        assert len(case["losses"]) == 2 and all(math.isfinite(v) for v in case["losses"]), case
        assert case["losses_finite"] is True and case["all_finite"] is True and case["skipped_updates"] == 0
        assert case["precision"] == "fp32" and case["device"] == "cpu"
        assert case["unet_rank"] > 0 and case["text_rank"] > 0 and case["reconstruction"] > 0  # adapters on
        assert len(case["step_times"]) == 2 and case["s_per_step"] > 0
        assert case["parameters"]["unet"] > 0
    assert "text_encoder_2" in cases["tiny-sdxl"]["parameters"]
    assert cases["tiny-sdxl"]["checkpointing"] is True
    # one printed line per figure
    lines = [line for line in process.stdout.splitlines() if line.startswith("tiny-")]
    assert len(lines) == 2 and all("s/step" in line and "every loss finite" in line for line in lines), process.stdout
