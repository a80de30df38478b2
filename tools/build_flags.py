"""The kernel library's compiler and linker flags: one source for make and setup.py.

Bazel's `BUILD` repeats `PROJECT_CXXFLAGS` in its `copts` (Starlark cannot
import Python); keep the two in step.
"""

import os

# -mavx: TensorFlow's own wheels require AVX, so wherever TF runs this does;
# the kernel's 8-lane float path needs it.
# -ffp-contract=off: results are bit-identical to the numpy reference only
# if no a * b + c is fused into an FMA (sparse_adam.cc says so too).
# -DNDEBUG: TF's wheels are built with it, and some of its classes (the
# graph's EdgeSet, so Node) have debug-only members: without it the graph
# pass would read TF's nodes with another layout.
PROJECT_CXXFLAGS = ["-O3", "-mavx", "-ffp-contract=off", "-fPIC", "-DNDEBUG"]


def compile_flags() -> list[str]:
    """Returns TensorFlow's compile flags plus the project's."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    return [*tf.sysconfig.get_compile_flags(), *PROJECT_CXXFLAGS]


def link_flags() -> list[str]:
    """Returns TensorFlow's link flags, `libtensorflow_cc.so.2` and an rpath to them.

    `libtensorflow_cc.so.2` holds TF's protos (`TPUEmbeddingConfiguration`),
    which the engine parses.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    return [
        *tf.sysconfig.get_link_flags(),
        "-l:libtensorflow_cc.so.2",
        f"-Wl,-rpath,{tf.sysconfig.get_lib()}",
    ]
