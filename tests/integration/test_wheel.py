"""What a user pip-installs, built and installed for real: deploy/wheel/build makes the
sdist and the manylinux abi3 wheel (from the sdist, as PyPI users' pip would), the wheel
goes into a fresh virtualenv on a PATH without cargo or rustc, and that install imports
the compiled core and runs the worker natively against the local Kafka and Elasticsearch.
The sdist then shows the other side of the contract: without Rust a build fails and says
how to get on, unless ENVOYGEO_PURE_PYTHON=1 asks for the pure-Python wheel.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import venv
import zipfile
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from elasticsearch import Elasticsearch

from tests.integration.harness import (
    ROOT,
    catches_sigterm,
    fluent_bit_record,
    produce,
    wait_for_count,
    write_config,
)
from tests.unit.decode_samples import sample_lines

RECORDS = 200


def path_without_rust() -> str:
    """This machine's PATH minus every directory holding cargo or rustc."""
    keep = [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if d and not any(os.access(os.path.join(d, t), os.X_OK) for t in ("cargo", "rustc"))]
    path = os.pathsep.join(keep)
    assert shutil.which("cargo", path=path) is None and shutil.which("rustc", path=path) is None
    return path


def env_without_rust(home: Path) -> dict[str, str]:
    """A build/run environment where no Rust toolchain can be found: PATH without it, and a
    HOME without ~/.cargo/bin (setup.py and rustup both look there)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CARGO", "RUSTUP", "ENVOYGEO_", "VIRTUAL_ENV", "PYTHON"))}
    env["PATH"] = path_without_rust()
    env["PIP_CACHE_DIR"] = str(Path.home() / ".cache" / "pip")  # downloads, not builds
    env["HOME"] = str(home)
    home.mkdir(exist_ok=True)
    return env


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([str(ROOT / "deploy" / "wheel" / "build")], capture_output=True,
                          text=True, timeout=1200, env={**os.environ, "DIST_DIR": str(out)})
    assert proc.returncode == 0, f"deploy/wheel/build failed:\n{proc.stderr[-6000:]}"
    assert "wheel: built in " in proc.stdout, proc.stdout
    return out


def fresh_venv(where: Path) -> Path:
    venv.EnvBuilder(with_pip=True, clear=True).create(where)
    return where / "bin" / "python"


def test_wheel_is_abi3_manylinux_with_the_core(dist: Path) -> None:
    wheels = sorted(dist.glob("*.whl"))
    sdists = sorted(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in dist.iterdir())
    name = wheels[0].name
    assert re.fullmatch(r"envoygeo-[\w.]+-cp311-abi3-manylinux_2_\d+_x86_64\.whl", name), name
    with zipfile.ZipFile(wheels[0]) as zf:
        files = zf.namelist()
        wheel_meta = next(f for f in files if f.endswith(".dist-info/WHEEL"))
        assert "Root-Is-Purelib: false" in zf.read(wheel_meta).decode()
    assert "pipeline/_native.abi3.so" in files, [f for f in files if "native" in f]
    # Nothing from the build tree leaks into the wheel.
    assert not any(f.startswith(("native/", "tests/", "deploy/")) for f in files)


def test_wheel_in_fresh_venv_runs_native_without_rust(
    dist: Path, tmp_path: Path, kafka_bootstrap: str, es_url: str, es_client: Elasticsearch,
    unique: Callable[[str], str],
) -> None:
    env = env_without_rust(tmp_path / "home")
    python = fresh_venv(tmp_path / "venv")
    wheel = next(dist.glob("*.whl"))
    pip = subprocess.run([str(python), "-m", "pip", "install", "-q",
                          "--disable-pip-version-check", str(wheel)],
                         capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert pip.returncode == 0, pip.stderr[-4000:]
    assert "running pip as the 'root' user" not in pip.stderr.lower()

    # Run from a directory without the checkout: `pipeline` must come from the venv.
    probe = subprocess.run(
        [str(python), "-c", "import pipeline, pipeline._native as n; "
         "print(pipeline.__file__); print(n.__file__)"],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    package, core = probe.stdout.split()
    assert package.startswith(str(tmp_path / "venv")) and core.endswith("_native.abi3.so"), (
        probe.stdout)

    envoygeo = str(tmp_path / "venv" / "bin" / "envoygeo")
    topic, group, index = unique("wheel-topic"), unique("wheel-group"), unique("wheel")
    config = write_config(tmp_path / "config.yaml", bootstrap=kafka_bootstrap, es_url=es_url,
                          topic=topic, group=group, index=index)
    setup = subprocess.run([envoygeo, "setup", "-c", str(config)], capture_output=True,
                           text=True, timeout=120, env=env, cwd=tmp_path)
    assert setup.returncode == 0, setup.stderr[-4000:]
    lines = [line for _, line in sample_lines()]
    base = time.time()
    values = [fluent_bit_record(lines[i % len(lines)], base + i * 0.001) for i in range(RECORDS)]
    assert produce(kafka_bootstrap, topic, values) == RECORDS

    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen([envoygeo, "run", "-c", str(config)], stdout=log,
                                  stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        wait_for_count(es_client, index, RECORDS, timeout_s=120)
        while not catches_sigterm(worker.pid) and worker.poll() is None:
            time.sleep(0.05)
        worker.terminate()
        assert worker.wait(60) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
        for name in (index, f"{index}-alerts"):
            es_client.indices.delete(index=name, ignore_unavailable=True)
    events = [orjson.loads(line) for line in log_path.read_bytes().splitlines()
              if line.startswith(b"{")]
    started = [e for e in events if e.get("message") == "envoygeo worker started"]
    assert len(started) == 1, events[:10]
    assert started[0]["native"] == "on", started[0]


def test_sdist_without_rust_fails_loudly_unless_pure_python_is_asked(
    dist: Path, tmp_path: Path,
) -> None:
    env = env_without_rust(tmp_path / "home")
    sdist = next(dist.glob("*.tar.gz"))
    out = tmp_path / "wheels"

    def pip_wheel(extra_env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
             "-w", str(out), str(sdist)],
            capture_output=True, text=True, timeout=600, env={**env, **extra_env}, cwd=tmp_path)

    failed = pip_wheel({})
    assert failed.returncode != 0
    said = failed.stdout + failed.stderr
    assert "needs Rust" in said and "ENVOYGEO_PURE_PYTHON=1" in said, said[-3000:]
    assert not out.exists() or not list(out.glob("*.whl"))

    pure = pip_wheel({"ENVOYGEO_PURE_PYTHON": "1"})
    assert pure.returncode == 0, pure.stderr[-3000:]
    wheels = list(out.glob("*.whl"))
    assert [w.name for w in wheels] == [re.sub(r"\.tar\.gz$", "-py3-none-any.whl", sdist.name)]
    with zipfile.ZipFile(wheels[0]) as zf:
        assert not [f for f in zf.namelist() if "_native" in f]
        assert "pipeline/worker.py" in zf.namelist()
