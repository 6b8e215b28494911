"""The GPU kit and check script, offline: repacking, the install plan, the size check, and
bench/gpu/check.sh's CPU mode installing a small kit made from this environment's wheels."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bench.gpu import check, kit

REPO = Path(__file__).resolve().parent.parent


def _fake_ray_wheel(path: Path) -> Path:
    files = {
        "ray/__init__.py": b"__version__ = '2.60.0'\n",
        "ray/jars/ray_dist.jar": b"java" * 1000,
        "ray/rllib/__init__.py": b"",
        "ray/dashboard/client/build/main.js": b"js",
        "ray/dashboard/__init__.py": b"",
        "ray/core/src/ray/raylet/raylet": b"#!/bin/sh\n",
        "ray-2.60.0.dist-info/METADATA": b"Name: ray\nVersion: 2.60.0\n",
        "ray-2.60.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: false\n",
        "ray-2.60.0.dist-info/RECORD": b"stale,,\n",
    }
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o755 if name.endswith("raylet") else 0o644) << 16
            z.writestr(info, data)
    return path


def test_slim_ray_drops_what_ftlaunch_never_loads_and_writes_a_true_record(tmp_path):
    src = _fake_ray_wheel(tmp_path / "ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl")
    dst = tmp_path / "slim.whl"
    counts = kit.slim_ray(src, dst)
    assert counts == {"kept": 5, "dropped": 3}
    with zipfile.ZipFile(dst) as z:
        names = set(z.namelist())
        assert "ray/__init__.py" in names and "ray/dashboard/__init__.py" in names
        assert not any(
            n.startswith(("ray/jars/", "ray/rllib/", "ray/dashboard/client/")) for n in names
        )
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_LZMA}
        raylet = z.getinfo("ray/core/src/ray/raylet/raylet")
        assert (raylet.external_attr >> 16) & 0o111  # still executable
        rows = list(csv.reader(io.StringIO(z.read("ray-2.60.0.dist-info/RECORD").decode())))
        for name, digest, size in rows:
            if name.endswith("RECORD"):
                continue
            data = z.read(name)
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            assert digest == f"sha256={expected.decode()}" and int(size) == len(data)
        assert {r[0] for r in rows} == names


def test_a_python_without_pip_gets_the_wheel_unpacked_with_its_executables(tmp_path):
    kit.slim_ray(_fake_ray_wheel(tmp_path / "ray.whl"), tmp_path / "slim.whl")
    kit.unpack_wheel(tmp_path / "slim.whl", tmp_path / "site")
    raylet = tmp_path / "site" / "ray/core/src/ray/raylet/raylet"
    assert raylet.read_bytes() == b"#!/bin/sh\n" and os.access(raylet, os.X_OK)
    assert (tmp_path / "site" / "ray-2.60.0.dist-info" / "RECORD").exists()
    assert not (tmp_path / "site" / "ray" / "jars").exists()


def test_strip_leaves_anything_that_is_not_an_elf_binary_alone():
    assert kit.strip_binaries("x.py", b"print(1)\n") == b"print(1)\n"
    assert kit.strip_elf(b"\x7fELF but broken") == b"\x7fELF but broken"


def test_the_kit_leaves_the_image_libraries_and_the_oversized_ones_out(tmp_path):
    names = ["ray-2.60.0-cp312-cp312-x.whl", "numpy-2.4.6-cp312-cp312-x.whl"]
    names += ["typing_extensions-4.16.0-py3-none-any.whl", "matplotlib-3.11.2-cp312-x.whl"]
    names += ["pydantic_core-2.50.4-cp312-x.whl", "pillow-13.0.0-cp312-x.whl"]
    carried, left = kit.kit_wheels(Path(n) for n in names)
    assert [kit.wheel_name(w) for w in carried] == ["ray", "pydantic-core"]
    assert {kit.wheel_name(w) for w in left} == {
        "numpy",
        "typing-extensions",
        "matplotlib",
        "pillow",
    }


def test_install_plan_keeps_the_environment_copy(tmp_path):
    for name in ("ray-2.60.0-cp312-cp312-x.whl", "PyYAML-6.0.3-cp312-cp312-x.whl"):
        (tmp_path / name).write_bytes(b"")
    chosen, skipped = kit.install_plan(tmp_path, {"pyyaml": "6.0.1"})
    assert [w.name for w in chosen] == ["ray-2.60.0-cp312-cp312-x.whl"]
    assert skipped == {"pyyaml": "6.0.1"}
    chosen, skipped = kit.install_plan(tmp_path, {"pyyaml": "6.0.1"}, everything=True)
    assert len(chosen) == 2 and skipped == {}


def test_size_report_fails_above_the_limit():
    small = kit.SizeReport(kit=40 * 2**20, tracked=2**20)
    assert small.fits and "= 41.0 MiB (limit 60 MiB)" in small.line()
    assert not kit.SizeReport(kit=60 * 2**20, tracked=2**20).fits


def test_tracked_tree_is_small_enough_to_leave_room_for_the_kit():
    assert kit.mib(kit.tracked_bytes(REPO)) < 8


def test_bench_figures_pick_ratios_and_mfu_of_both_training_sections():
    result = {
        "sections": {
            "train_tiny": {"ratio": 0.95, "ftlaunch_mfu": 0.31, "plain_mfu": 0.33},
            "train_smollm2": {"error": "RuntimeError: boom"},
        }
    }
    assert check.bench_figures(result) == {
        "gpt2_ratio": 0.95,
        "gpt2_ftlaunch_mfu": 0.31,
        "gpt2_plain_mfu": 0.33,
        "smollm2_lora_error": "RuntimeError: boom",
    }


def test_the_end_to_end_recipes_are_valid_and_let_auto_pick_the_gpu(tmp_path):
    from launcher.recipe import validate_data

    lora = validate_data(check.lora_body(tmp_path / "m", tmp_path / "d.jsonl", tmp_path / "r"))
    full = validate_data(check.full_body(tmp_path / "m", tmp_path / "d.jsonl", tmp_path / "r"))
    assert lora.finetune.method == "lora" and full.finetune.method == "full"
    assert lora.train.max_steps == check.LORA_STEPS and full.train.max_steps == check.FULL_STEPS
    assert {lora.scaling.use_gpu, full.scaling.use_gpu} == {"auto"}
    assert lora.data.packing and full.data.max_length == 512
    assert full.checkpoint.every == check.FULL_STEPS  # one checkpoint, at the end


def test_end_to_end_jobs_get_an_mfu_from_their_model_shape(tiny_gpt2):
    from transformers import AutoModelForCausalLM

    from bench.hardware import Accelerator, matmul_parameters

    a100 = Accelerator("cuda", "NVIDIA A100-SXM4-80GB", 1, 312.0)
    params = matmul_parameters(AutoModelForCausalLM.from_pretrained(tiny_gpt2))
    full = check.job_mfu(tiny_gpt2, 1e6, 32, False, a100)
    lora = check.job_mfu(tiny_gpt2, 1e6, 32, True, a100)
    assert full == pytest.approx(1e6 * (6 * params + 12 * 2 * 64 * 32) / 312e12)
    assert lora < full
    assert check.job_mfu(tiny_gpt2, None, 32, False, a100) is None


def test_step_limits_leave_room_for_a_rerun_in_a_15_minute_lease():
    start_up = 180  # a fresh device machine
    assert start_up + 2 * check.BUDGET_S <= 15 * 60
    assert set(check.STEP_LIMITS) == {name for name, _ in check.STEPS}
    assert sum(check.STEP_LIMITS.values()) <= check.BUDGET_S


@pytest.fixture(scope="module")
def small_kit(tmp_path_factory) -> Path:
    """A kit of two pure-Python wheels rebuilt from this environment, offline."""
    out = tmp_path_factory.mktemp("kit")
    for name in ("gguf", "hjson"):
        kit.wheel_from_installed(name, out)
    return out


def test_check_script_cpu_mode_installs_the_kit_and_reports(small_kit, tmp_path):
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OUT": str(out),
        "FTLAUNCH_GPU_KIT": str(small_kit),
        "FTLAUNCH_KIT_INSTALL": "all",  # this environment has both already: install anyway
        "PYTHON": sys.executable,
    }
    done = subprocess.run(
        ["bash", "bench/gpu/check.sh", "--cpu"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| install | passed |" in done.stdout
    report = json.loads(next(out.glob("gpu-check-*.json")).read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert report["mode"] == "cpu" and report["ok"]
    assert steps["install"]["figures"]["installed"] == 2
    assert steps["gpu_tests"]["status"] == "passed"
    tests = steps["gpu_tests"]["figures"]
    assert tests["tests"] == tests["skipped"] > 0
    for name in ("submit_smollm2_lora", "submit_gpt2_full", "bench"):
        assert steps[name]["status"] == "skipped" and steps[name]["detail"] == "no CUDA GPU"


def test_built_kit_fits_and_carries_a_slim_ray():
    manifest = kit.KIT_DIR / "manifest.json"
    if not manifest.exists():
        pytest.skip("no .gpu-kit here (make gpu-kit builds it; it needs PyPI)")
    report = kit.SizeReport(kit.folder_bytes(kit.KIT_DIR), kit.tracked_bytes(REPO))
    assert report.fits, report.line()
    wheels = {kit.wheel_name(w): w for w in kit.KIT_DIR.glob("*.whl")}
    assert {"ray", "deepspeed", "pydantic", "pydantic-core", "datasets", "gguf"} <= set(wheels)
    assert not set(wheels) & kit.IMAGE_PROVIDES
    with zipfile.ZipFile(wheels["ray"]) as z:
        assert not any(n.startswith(kit.RAY_DROPPED) for n in z.namelist())
