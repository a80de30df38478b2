"""Prints TensorFlow's compile and link flags as Makefile variables.

The shared library also links `libtensorflow_cc.so.2`, whose symbols include
TF's protos (`TPUEmbeddingConfiguration`) that the engine parses.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

lib_dir = tf.sysconfig.get_lib()
print("TF_CFLAGS := " + " ".join(tf.sysconfig.get_compile_flags()))
print(
    "TF_LFLAGS := "
    + " ".join(tf.sysconfig.get_link_flags())
    + f" -l:libtensorflow_cc.so.2 -Wl,-rpath,{lib_dir}"
)
