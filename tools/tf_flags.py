"""Prints the kernel library's compile and link flags as Makefile variables."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from build_flags import compile_flags, link_flags  # noqa: E402

print("TF_CFLAGS := " + " ".join(compile_flags()))
print("TF_LFLAGS := " + " ".join(link_flags()))
