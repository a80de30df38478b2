"""Installs tpu_embed_adam and builds its TensorFlow kernel library.

The kernel library is compiled against the TensorFlow in the build
environment, so install with `pip install --no-build-isolation .` into an
environment that already has tensorflow-cpu==2.15.1 (or tensorflow==2.15.1 for
GPU machines). Set TPU_EMBED_ADAM_SKIP_BUILD=1 to skip the C++ build (the
package then runs on its pure-TensorFlow path); `make lib` builds it
incrementally in a development checkout.
"""

import glob
import os
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext


class _TfBuildExt(build_ext):
    """Adds TensorFlow's and the project's flags (tools/build_flags.py)."""

    def build_extensions(self) -> None:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools"))
        from build_flags import compile_flags, link_flags

        for ext in self.extensions:
            ext.extra_compile_args = [*compile_flags(), "-I."]
            ext.extra_link_args = link_flags()
        super().build_extensions()


def _tf_distribution() -> str:
    """Returns which TensorFlow distribution to require.

    `tensorflow-cpu` by default; `tensorflow` (the GPU build, same API and
    ops) when TPU_EMBED_ADAM_TF_PACKAGE=tensorflow, or when `tensorflow` is
    already installed without `tensorflow-cpu`, so that a GPU environment does
    not get a second, CPU-only TensorFlow beside its own.
    """
    chosen = os.environ.get("TPU_EMBED_ADAM_TF_PACKAGE")
    if chosen:
        if chosen not in ("tensorflow", "tensorflow-cpu"):
            raise SystemExit(
                f"TPU_EMBED_ADAM_TF_PACKAGE must be tensorflow or tensorflow-cpu; got {chosen!r}"
            )
        return chosen
    from importlib import metadata

    def installed(name: str) -> bool:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            return False
        return True

    if installed("tensorflow") and not installed("tensorflow-cpu"):
        return "tensorflow"
    return "tensorflow-cpu"


_EXT_MODULES = []
if not os.environ.get("TPU_EMBED_ADAM_SKIP_BUILD"):
    _EXT_MODULES.append(
        Extension(
            "tpu_embed_adam._tpu_embed_adam_ops",
            sources=sorted(glob.glob("tpu_embed_adam/cc/**/*.cc", recursive=True)),
            depends=sorted(glob.glob("tpu_embed_adam/cc/**/*.h", recursive=True)),
            language="c++",
        )
    )

setup(
    name="tpu_embed_adam",
    version="0.1.0",
    description=(
        "TPU embedding sparse Adam for TensorFlow: AdamParameters, a fused CPU "
        "kernel and a software TPU embedding engine."
    ),
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["tpu_embed_adam", "tpu_embed_adam.*"]),
    install_requires=[
        f"{_tf_distribution()}==2.15.1",
        "tensorflow-estimator==2.15.0",
        "protobuf>=3.20.3,<5",
        "absl-py>=1.0",
        "numpy<2",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "hypothesis>=6",
            "ruff",
            "mypy",
            "grpcio-tools>=1.50,<1.63",
            # Peer check of the lazy update against LazyAdam (tests/test_reference.py).
            "tensorflow-addons==0.23.0",
            # `tpu-embed-adam inspect --plot` (tests/test_cli_inspect.py).
            "matplotlib",
        ],
        # `tpu-embed-adam inspect --plot`.
        "plot": ["matplotlib"],
        "bench": ["tensorflow-addons==0.23.0", "torch==2.13.0", "matplotlib"],
    },
    ext_modules=_EXT_MODULES,
    cmdclass={"build_ext": _TfBuildExt},
    # Outside the package, which imports TensorFlow: the script sets TF's C++
    # log level first (tpu_embed_adam_cli's docstring).
    py_modules=["tpu_embed_adam_cli"],
    entry_points={"console_scripts": ["tpu-embed-adam=tpu_embed_adam_cli:run"]},
    zip_safe=False,
)
