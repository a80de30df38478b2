"""Runs pytest under `bazel test` (main of every py_test made by pytest_tests).

Before the tests it checks that `tpu_embed_adam` is the Bazel-built one: the
package, its generated `optimization_parameters_pb2` and the kernel library
`_tpu_embed_adam_ops.so` must come from the test's runfiles, not from the source
tree (the venv has an editable install of the source tree, which must not win).
`--check-only`: only the check (target //:bazel_layout_test).
"""

from __future__ import annotations

import os
import sys


def _runfiles_root() -> str:
    for var in ("RUNFILES_DIR", "TEST_SRCDIR"):
        if os.environ.get(var):
            return os.path.realpath(os.environ[var])
    sys.exit("pytest_main: not run by Bazel (no RUNFILES_DIR/TEST_SRCDIR)")


def _check_bazel_package() -> None:
    root = _runfiles_root()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tpu_embed_adam
    from tpu_embed_adam import optimization_parameters_pb2 as pb2

    pkg_dir = os.path.dirname(os.path.abspath(tpu_embed_adam.__file__))
    so = os.path.join(pkg_dir, "_tpu_embed_adam_ops.so")
    errors = []
    # Runfiles entries are symlinks: the path must be in the runfiles tree ...
    if not os.path.realpath(pkg_dir).startswith(root + os.sep):
        errors.append(f"tpu_embed_adam imported from {pkg_dir}, not from runfiles {root}")
    if not os.path.abspath(pb2.__file__).startswith(pkg_dir + os.sep):
        errors.append(f"optimization_parameters_pb2 imported from {pb2.__file__}")
    # ... and generated outputs must point into bazel-out, not the source tree.
    for label, path in (("optimization_parameters_pb2", pb2.__file__), ("kernel library", so)):
        if not os.path.exists(path):
            errors.append(f"{label} missing: {path}")
        elif "/bazel-out/" not in os.path.realpath(path):
            errors.append(f"{label} is not Bazel's output: {os.path.realpath(path)}")
    # The loader must pick the runfiles library, not a `make lib` one in the source
    # tree (e.g. if it resolved the symlinked _library.py to the source tree).
    from tpu_embed_adam import _library

    candidates = [str(p) for p in _library.library_candidates()]
    if not candidates or os.path.abspath(candidates[0]) != so:
        errors.append(
            f"_library.py would load {candidates[:1] or 'nothing'}, not {so}"
            " (does it resolve() its own symlinked path into the source tree?)"
        )
    print(f"pytest_main: tpu_embed_adam from {tpu_embed_adam.__file__}")
    print(f"pytest_main: optimization_parameters_pb2 -> {os.path.realpath(pb2.__file__)}")
    print(f"pytest_main: kernel library -> {os.path.realpath(so)}")
    if errors:
        sys.exit("pytest_main: not the Bazel-built package:\n  " + "\n  ".join(errors))


def main(argv: list[str]) -> int:
    _check_bazel_package()
    if argv == ["--check-only"]:
        print("pytest_main: ok, the Bazel-built package (runfiles, bazel-out pb2 and .so)")
        return 0
    # Writable places: the runfiles tree is read-only in the sandbox.
    tmp = os.environ.get("TEST_TMPDIR") or os.environ.get("TMPDIR", "/tmp")
    os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tmp, ".hypothesis"))
    import pytest

    args = ["-p", "no:cacheprovider"]
    xml = os.environ.get("XML_OUTPUT_FILE")
    if xml:
        args += ["--junitxml", xml]
    return int(pytest.main(args + ["-q", "-rs", *argv]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
