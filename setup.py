"""Build glue for the compiled core; everything declarative lives in pyproject.toml.

Why a setup.py at all: whether the wheel carries `pipeline._native` must be a decision the
user makes, not an accident of what is on the build machine. setuptools-rust's static
configuration can only make the extension required (no escape hatch for platforms without
Rust) or optional (a machine without cargo silently builds a wheel ~8x slower on the hot
path). So the extension is required, a missing toolchain fails with a message naming the
way out, and `ENVOYGEO_PURE_PYTHON=1` builds the pure-Python wheel on purpose.

The binary wheel is abi3 (`cp311-abi3`, one wheel for CPython 3.11 and later): the crate
enables pyo3's `abi3-py311` feature, and bdist_wheel's `py_limited_api` tags it so.
`deploy/wheel/build` then runs auditwheel to give it a `manylinux_2_xx` tag.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

PURE_ENV = "ENVOYGEO_PURE_PYTHON"


def _pure_python() -> bool:
    value = os.environ.get(PURE_ENV, "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    sys.exit(f"error: {PURE_ENV}={value!r}: use 1 (build without the compiled core) or 0")


def _cargo() -> str | None:
    found = shutil.which("cargo")
    if found:
        return found
    # rustup installs into ~/.cargo/bin without always putting it on PATH.
    candidate = Path.home() / ".cargo" / "bin" / "cargo"
    return str(candidate) if candidate.is_file() else None


if _pure_python():
    setup()
else:
    from setuptools_rust import Binding, RustExtension
    from setuptools_rust.build import build_rust

    class build_rust_or_explain(build_rust):  # noqa: N801 - setuptools command naming
        """Fails before cargo is needed, with the two ways forward, when there is no Rust."""

        def run(self) -> None:
            cargo = _cargo()
            if cargo is None:
                raise SystemExit(
                    "error: building envoygeo's compiled core (pipeline._native) needs Rust "
                    "(cargo and rustc >= 1.74), and no cargo was found on PATH or in "
                    "~/.cargo/bin.\n"
                    "  - install Rust (https://rustup.rs, or Debian's cargo/rustc packages) "
                    "and build again, or\n"
                    f"  - build the pure-Python package on purpose: {PURE_ENV}=1 "
                    "(every record then takes the Python path, about 8x the CPU per record)."
                )
            os.environ["PATH"] = os.pathsep.join(
                [str(Path(cargo).parent), os.environ.get("PATH", "")]
            )
            super().run()

    setup(
        rust_extensions=[
            RustExtension(
                "pipeline._native",
                path="native/Cargo.toml",
                binding=Binding.PyO3,
                py_limited_api="auto",
                debug=False,
                optional=False,
            )
        ],
        cmdclass={"build_rust": build_rust_or_explain},
        options={"bdist_wheel": {"py_limited_api": "cp311"}},
    )
