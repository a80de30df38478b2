"""The `tpu-embed-adam` console script: TF's C++ log level is set before TensorFlow loads.

    tpu-embed-adam info                     # TF's C++ log lines off
    tpu-embed-adam info --verbosity=0       # on, from INFO (-1: warnings, -2: errors)
    python -m tpu_embed_adam_cli info       # the same without the script

Importing `tpu_embed_adam` imports TensorFlow, which logs from C++ while it
loads (its CPU feature guard: "To enable the following instructions: AVX2
FMA ...") at the level TF_CPP_MIN_LOG_LEVEL gives at its first line. Code in
the package runs only after that, so the entry point lives outside it: it
reads `--verbosity` from the command line, sets TF_CPP_MIN_LOG_LEVEL, and
only then imports `tpu_embed_adam.cli`. What `import tpu_embed_adam` does for
a library user is unchanged. (`python -m tpu_embed_adam.cli` imports the
package first, so TF's lines print there whatever `--verbosity` says.)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["run"]


def _verbosity(argv: Sequence[str]) -> int | None:
    """`--verbosity`'s value, or None when absent or malformed (the CLI's parser reports it)."""
    scan = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    scan.add_argument("-v", "--verbosity", type=int)
    try:
        return scan.parse_known_args(argv)[0].verbosity
    except argparse.ArgumentError:
        return None


def _tf_log_level(verbosity: int | None) -> str:
    """TF_CPP_MIN_LOG_LEVEL for absl's `--verbosity` (None, not given: off)."""
    if verbosity is None:
        return "3"
    return str(min(3, max(0, -verbosity)))


def run() -> None:
    """Sets TF's C++ log level from `--verbosity`, then runs the command line."""
    # A user's own TF_CPP_MIN_LOG_LEVEL wins unless --verbosity is given.
    verbosity = _verbosity(sys.argv[1:])
    if verbosity is not None or "TF_CPP_MIN_LOG_LEVEL" not in os.environ:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = _tf_log_level(verbosity)
    from tpu_embed_adam import cli

    cli.run()


if __name__ == "__main__":
    run()
