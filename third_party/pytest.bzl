"""pytest_tests: one py_test per pytest file, run by //:tools/pytest_main.py."""

def pytest_tests(srcs, deps = [], data = [], args = [], size = "medium", tags = [], **kwargs):
    """Declares a py_test named after each file (tests/ops/test_fused.py -> tests/ops/test_fused).

    Each test runs `pytest <file>` through tools/pytest_main.py, which first checks
    that `tpu_embed_adam` comes from the Bazel runfiles (Bazel-built .so and pb2).
    """
    names = []
    for src in srcs:
        name = src[:-len(".py")]
        native.py_test(
            name = name,
            srcs = ["tools/pytest_main.py", src],
            main = "tools/pytest_main.py",
            args = args + [src],
            deps = deps,
            data = data,
            python_version = "PY3",
            srcs_version = "PY3",
            size = size,
            tags = tags,
            **kwargs
        )
        names.append(name)
    return names
