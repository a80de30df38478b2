r"""Fuzzes `AdamParameters`' readers, `apply_adam` and the engine's configuration parsing.

  python tools/fuzz.py --target=from_proto --count=1000000
  python tools/fuzz.py --target=engine_config --count=20000 --engine=random
  python tools/fuzz.py --target=all --count=1000   # every target in turn

Targets and the property are in `tools/fuzz_targets.py`: every input either
succeeds (and round-trips / equals the reference update) or raises a
documented error type, and a rejected call changes no state; the engine
target runs `ConfigureTPUEmbedding` in a child process, so that a crash is
caught with its input.

Engines:
  atheris: coverage-guided (libFuzzer) over Python code of `tpu_embed_adam`
    (and `json`),
    with a structure-aware custom mutator (protobuf field edits, JSON/dict
    value edits), when `atheris` is installed (`pip install atheris`);
    `--count` is libFuzzer's `-runs`. A violation stops the run, and
    libFuzzer writes the input to `crash-*` in `--artifact_dir`.
  random: the same structure-aware generator, seeded per input from
    `--seed`; no coverage feedback. A violation is printed with a
    reproducer and the run goes on (`--max_failures`).

Prints the count, the wall time, the rate and the outcome counts (which
errors the inputs raised). Exit status 1 if any input broke the property.
"""

from __future__ import annotations

import collections
import os
import random
import sys
import time
from collections.abc import Iterator

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fuzz_targets as ft  # noqa: E402
from absl import app, flags  # noqa: E402

_TARGET = flags.DEFINE_enum("target", "from_proto", [*ft.TARGETS, "all"], "What to fuzz.")
_COUNT = flags.DEFINE_integer("count", 10_000, "Inputs per target.")
_ENGINE = flags.DEFINE_enum(
    "engine", "auto", ["auto", "atheris", "random"],
    "auto: atheris when installed, for the in-process targets; random otherwise.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random engine.")
_MAX_FAILURES = flags.DEFINE_integer("max_failures", 20, "Stop after this many violations.")
_ARTIFACT_DIR = flags.DEFINE_string("artifact_dir", "build/fuzz", "Where atheris writes crashes.")
_REPORT_EVERY = flags.DEFINE_integer("report_every", 0, "Print progress every N inputs (0: 10%).")


def _checked(
    target: str, count: int, seed: int, worker: ft.EngineWorker | None
) -> Iterator[tuple[int, str | ft.PropertyViolation]]:
    """Yields `(input index, outcome label or violation)` for inputs 0..count-1."""
    seeds = ft.seed_engine_configs() if target == "engine_config" else None
    values = ((i, ft.generate(target, random.Random(f"{seed}:{target}:{i}"), seeds))
              for i in range(count))
    if worker is not None:
        yield from worker.run_all(values)
        return
    for i, value in values:
        try:
            yield i, ft.check(target, value)
        except ft.PropertyViolation as e:
            yield i, e


def _run_random(target: str, count: int, seed: int) -> int:
    worker = ft.EngineWorker() if target == "engine_config" else None
    outcomes: collections.Counter[str] = collections.Counter()
    failures = 0
    every = _REPORT_EVERY.value or max(count // 10, 1)
    start = time.perf_counter()
    try:
        for i, outcome in _checked(target, count, seed, worker):
            if isinstance(outcome, ft.PropertyViolation):
                failures += 1
                outcomes["VIOLATION"] += 1
                print(f"VIOLATION #{failures} at input {i} (seed {seed}): {outcome}", flush=True)
                print(f"  reproduce: python tools/fuzz.py --target={target} --seed={seed} "
                      f"--engine=random --count={i + 1}  (input {i})", flush=True)
                if failures >= _MAX_FAILURES.value:
                    break
            else:
                outcomes[outcome] += 1
            if (i + 1) % every == 0:
                el = time.perf_counter() - start
                print(f"  {target}: {i + 1}/{count} in {el:.1f} s ({(i + 1) / el:,.0f}/s)",
                      flush=True)
    finally:
        if worker is not None:
            worker.close()
    elapsed = time.perf_counter() - start
    n = sum(outcomes.values())
    print(f"{target}: {n} inputs in {elapsed:.1f} s ({n / elapsed:,.0f}/s), "
          f"{failures} violations; outcomes {dict(outcomes.most_common())}", flush=True)
    return failures


def _run_atheris(target: str, count: int) -> int:
    import atheris

    with atheris.instrument_imports(include=["tpu_embed_adam", "fuzz_targets", "json"]):
        import tpu_embed_adam  # noqa: F401

    seeds = ft.seed_engine_configs() if target == "engine_config" else None
    worker = ft.EngineWorker() if target == "engine_config" else None
    outcomes: collections.Counter[str] = collections.Counter()
    start = time.perf_counter()

    every = _REPORT_EVERY.value or max(count // 10, 1)

    def test_one_input(data: bytes) -> None:
        value = ft.decode(target, data, seeds)
        outcomes[ft.check(target, value, worker)] += 1
        if sum(outcomes.values()) % every == 0:
            report()

    def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        if rng.random() < 0.5:
            return atheris.Mutate(data, max_size)
        if target in ("from_proto", "from_tf_proto"):
            if data[:1] == b"\x00":
                return b"\x00" + ft.structured_mutation(
                    data[1:], ft.tf_optimization_parameters_class(), rng)[: max_size - 1]
            return b"\x00" + ft.proto_input(rng)[: max_size - 1]
        if target == "engine_config":
            base = data[1:] if data[:1] == b"\x00" else rng.choice(seeds or [b""])
            return b"\x00" + ft.structured_mutation(
                base, ft.tf_embedding_configuration_class(), rng)[: max_size - 1]
        # Generator targets: the bytes are the generator's seed; new bytes, new input.
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))

    def report() -> None:
        # libFuzzer ends the process with _exit: no atexit; report as we go.
        elapsed = time.perf_counter() - start
        n = sum(outcomes.values())
        print(f"{target}: {n} inputs in {elapsed:.1f} s ({n / max(elapsed, 1e-9):,.0f}/s); "
              f"outcomes {dict(outcomes.most_common())}", flush=True)

    os.makedirs(_ARTIFACT_DIR.value, exist_ok=True)
    argv = [sys.argv[0], f"-runs={count}", f"-artifact_prefix={_ARTIFACT_DIR.value}/{target}-",
            "-print_final_stats=1", "-max_len=4096"]
    atheris.Setup(argv, test_one_input, custom_mutator=custom_mutator)
    atheris.Fuzz()  # exits the process
    return 0


def main(argv: list[str]) -> None:
    del argv
    targets = ft.TARGETS if _TARGET.value == "all" else (_TARGET.value,)
    failures = 0
    for target in targets:
        engine = _ENGINE.value
        if engine == "auto":
            try:
                import atheris  # noqa: F401
                engine = "atheris" if len(targets) == 1 else "random"
            except ImportError:
                engine = "random"
        if engine == "atheris":
            if len(targets) > 1:
                raise app.UsageError("--engine=atheris runs one target (libFuzzer exits).")
            _run_atheris(target, _COUNT.value)
        failures += _run_random(target, _COUNT.value, _SEED.value)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    app.run(main)
