"""The numpy model of TF's TPUEmbedding training step: the oracle of the graph tests.

`NumpyModel` computes a step of `tensorflow.python.tpu.tpu_embedding.TPUEmbedding`
with numpy: the lookup with each table's combiner and weights, the backward
pass of the loss to one gradient row per id, and
`tpu_embed_adam.reference.adam_update` per table. Its inputs: `FeatureInput`
(one feature's ids on one core) gathered into a `Batch`, drawn by
`random_batch`, with targets from `random_targets`; its state: `Slots` per
table (`random_state` draws one, `assert_state_equal` compares two bit for bit).
`table_params`, `constant_learning_rate` and `activation_shape` read a
`TPUEmbedding`'s configuration as TF does; `four_features` is the feature set
most graph tests use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
from tensorflow.python.tpu import tpu_embedding

from tpu_embed_adam.reference import adam_update

_F32 = np.float32


@dataclasses.dataclass(frozen=True)
class FeatureInput:
    """One feature's ids on one core, sorted by sample.

    `sample_indices` is [nnz, 2] (sample, position within the sample), or None
    for one id per sample (TF's dense case).
    """

    ids: np.ndarray
    sample_indices: np.ndarray | None = None
    weights: np.ndarray | None = None

    def samples(self) -> np.ndarray:
        if self.sample_indices is None:
            return np.arange(len(self.ids))
        return self.sample_indices[:, 0]

    def positions(self) -> np.ndarray:
        if self.sample_indices is None:
            return np.zeros(len(self.ids), np.int64)
        return self.sample_indices[:, 1]

    def row_splits(self, batch_size: int) -> np.ndarray:
        """The same ids as a ragged tensor's [batch_size + 1] row splits."""
        counts = np.bincount(self.samples(), minlength=batch_size)
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


# One dict per core (global core order: host-major), feature name -> input.
Batch = list[dict[str, FeatureInput]]


@dataclasses.dataclass(frozen=True)
class Slots:
    """A whole table and its Adam slots, each [vocab, dim] float32."""

    w: np.ndarray
    m: np.ndarray
    v: np.ndarray


def table_params(emb: tpu_embedding.TPUEmbedding, table: str) -> tpu_embedding.AdamParameters:
    """The table's own `AdamParameters`, else the global ones (TF's rule)."""
    return (
        emb.table_to_config_dict[table].optimization_parameters or emb.optimization_parameters
    )


def constant_learning_rate(emb: tpu_embedding.TPUEmbedding, table: str) -> float | None:
    """The table's constant learning rate as TF writes it in the proto; None if dynamic."""
    config = emb.table_to_config_dict[table]
    if config.learning_rate:  # TF tests truthiness too: 0.0 falls through.
        return config.learning_rate
    if config.learning_rate_fn:
        return None
    return table_params(emb, table).learning_rate


def activation_shape(emb: tpu_embedding.TPUEmbedding, feature: str) -> tuple[int, ...]:
    """[batch_per_core, dim], or [batch_per_core, max_sequence_length, dim]."""
    config = emb.feature_to_config_dict[feature]
    dim = emb.table_to_config_dict[config.table_id].dimension
    if config.max_sequence_length:
        return (emb.batch_size_per_core, config.max_sequence_length, dim)
    return (emb.batch_size_per_core, dim)


def four_features() -> dict[str, tpu_embedding.FeatureConfig]:
    """Features of tables `users`, `items`, `tags`; `users` is shared by two
    features, so its update sums both features' gradients."""
    return {
        "user": tpu_embedding.FeatureConfig("users"),
        "friends": tpu_embedding.FeatureConfig("users"),
        "item": tpu_embedding.FeatureConfig("items"),
        "tag": tpu_embedding.FeatureConfig("tags"),
    }


def random_batch(
    rng: np.random.Generator,
    emb: tpu_embedding.TPUEmbedding,
    *,
    min_ids_per_sample: int = 1,
    max_ids_per_sample: int = 3,
    weighted: Sequence[str] = (),
    one_id_per_sample: Sequence[str] = (),
) -> Batch:
    """Draws ids for every feature on every core.

    Samples hold `min_ids_per_sample`..`max_ids_per_sample` ids (sequence
    features: up to one past `max_sequence_length`, so that the TPU's
    truncation is exercised), duplicates included, so that one row gets
    several gradients per step; with a minimum of 0 some samples are empty
    (but never a whole feature). Features in `weighted` get positive per-id
    weights; features in `one_id_per_sample` are enqueued without sample
    indices (TF's dense case).
    """
    batch: Batch = []
    for _ in range(emb.num_cores):
        core: dict[str, FeatureInput] = {}
        for feature, config in emb.feature_to_config_dict.items():
            vocab = emb.table_to_config_dict[config.table_id].vocabulary_size
            b = emb.batch_size_per_core
            if feature in one_id_per_sample:
                counts = np.ones(b, np.int64)
                indices = None
            else:
                most = config.max_sequence_length + 1 if config.max_sequence_length else (
                    max_ids_per_sample)
                counts = rng.integers(min_ids_per_sample, most + 1, b)
                counts[0] = max(counts[0], 1)
                rows = np.repeat(np.arange(b), counts)
                cols = np.concatenate([np.arange(c) for c in counts])
                indices = np.stack([rows, cols], 1).astype(np.int64)
            ids = rng.integers(0, vocab, counts.sum()).astype(np.int64)
            weights = rng.uniform(0.5, 1.5, len(ids)).astype(_F32) if feature in weighted else None
            core[feature] = FeatureInput(ids, indices, weights)
        batch.append(core)
    return batch


def random_targets(
    rng: np.random.Generator, emb: tpu_embedding.TPUEmbedding
) -> list[dict[str, np.ndarray]]:
    """Regression targets, one array of the activation's shape per core and feature."""
    return [
        {f: rng.normal(size=activation_shape(emb, f)).astype(_F32)
         for f in emb.feature_to_config_dict}
        for _ in range(emb.num_cores)
    ]


def _core_sum(
    ids: list[np.ndarray], grads: list[np.ndarray]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """One core's distinct ids (in order of first entry) and each one's gradient sum.

    Each sum starts from zero and adds the id's rows in entry order (features
    in order, then ids), in float32: what the engine forms on the core before
    it sums the cores' rows, in core order, into the update (docs/engine.md,
    "Training across processes"). With one core, `adam_update`'s own sum of
    the returned rows (0 + the row) is the row, so this is the same update as
    summing the occurrences directly.
    """
    all_ids, all_grads = np.concatenate(ids), np.concatenate(grads)
    distinct, first, inverse = np.unique(all_ids, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    sums = np.zeros((len(distinct), all_grads.shape[1]), _F32)
    np.add.at(sums, rank[inverse], all_grads)  # in index order: entry order per id
    return [distinct[order]], [sums]


class NumpyModel:
    """The step TF's graph runs, in numpy: lookup, loss, Adam per table.

    The loss is 0.5*|act - target|^2, or sum(act * target) with `linear_loss`.
    """

    def __init__(
        self, emb: tpu_embedding.TPUEmbedding, state: Mapping[str, Slots], linear_loss: bool = False
    ):
        self.emb = emb
        self.linear_loss = linear_loss
        self.state = {t: Slots(s.w.copy(), s.m.copy(), s.v.copy()) for t, s in state.items()}

    def _lookup_plan(
        self, feature: str, x: FeatureInput
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Returns (kept ids' positions in `x`, their activation slots, scales, slot count).

        A slot is a sample, or a (sample, position) cell of a sequence feature;
        ids at positions past `max_sequence_length` are dropped, as the TPU
        truncates. Each kept id contributes `scale * row` to its slot: its
        weight times the combiner's factor for the slot.
        """
        config = self.emb.feature_to_config_dict[feature]
        seq_len = config.max_sequence_length
        b = self.emb.batch_size_per_core
        kept = np.arange(len(x.ids))
        slots, n_slots = x.samples(), b
        if seq_len:
            kept = kept[x.positions() < seq_len]
            slots, n_slots = x.samples()[kept] * seq_len + x.positions()[kept], b * seq_len
        w = np.ones(len(kept), _F32) if x.weights is None else x.weights[kept].astype(_F32)
        combiner = self.emb.table_to_config_dict[config.table_id].combiner or "sum"
        if combiner == "sum":
            return kept, slots, w, n_slots
        # As the engine computes them (engine/batch.cc): each slot's
        # denominator in float64, each scale weight / denominator rounded once
        # to float32. Float32 arithmetic here would differ in the last bit
        # for some scales, and Adam turns that into visibly different tables
        # over a long run.
        w64 = w.astype(np.float64)
        total = np.zeros(n_slots)
        np.add.at(total, slots, w64 if combiner == "mean" else w64 * w64)
        denominator = (total if combiner == "mean" else np.sqrt(total))[slots]
        scale = np.divide(w64, denominator, out=np.zeros(len(kept)), where=denominator != 0)
        return kept, slots, scale.astype(_F32), n_slots

    def activations(self, core: Mapping[str, FeatureInput]) -> dict[str, np.ndarray]:
        """The lookup of one core, in the activations' shapes."""
        out = {}
        for feature, config in self.emb.feature_to_config_dict.items():
            x, table = core[feature], self.state[config.table_id].w
            kept, slots, scale, n_slots = self._lookup_plan(feature, x)
            act = np.zeros((n_slots, table.shape[1]), _F32)
            np.add.at(act, slots, scale[:, None] * table[x.ids[kept]])
            out[feature] = act.reshape(activation_shape(self.emb, feature))
        return out

    def forward_backward(
        self,
        batch: Batch,
        targets: Sequence[Mapping[str, np.ndarray]],
        backprop_from: Sequence[Mapping[str, np.ndarray]] | None = None,
    ) -> tuple[list[dict[str, np.ndarray]], float, dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Returns each core's activations, the loss, and each table's (ids, gradient rows).

        The loss gradient is taken at `backprop_from` (the activations TF
        computed the sent gradients from) when given, else at the numpy
        activations. Why: Adam scales every gradient element to a step of
        about the learning rate, so an element near 0 (activation ~ target)
        turns a 1-ulp difference between two correct lookups into a visible
        difference of the weights; the update must be checked on the gradients
        actually sent, the lookup separately.
        """
        acts, loss, ids, grads = self._per_core(batch, targets, backprop_from)
        return (
            acts,
            loss,
            {t: np.concatenate([np.concatenate(c) for c in i]) for t, i in ids.items()},
            {t: np.concatenate([np.concatenate(c) for c in g]) for t, g in grads.items()},
        )

    def _per_core(
        self,
        batch: Batch,
        targets: Sequence[Mapping[str, np.ndarray]],
        backprop_from: Sequence[Mapping[str, np.ndarray]] | None,
    ) -> tuple[
        list[dict[str, np.ndarray]],
        float,
        dict[str, list[list[np.ndarray]]],
        dict[str, list[list[np.ndarray]]],
    ]:
        """`forward_backward`, with each table's ids and gradient rows as [core][feature] lists."""
        acts = [self.activations(core) for core in batch]
        at = acts if backprop_from is None else backprop_from
        loss = 0.0
        ids: dict[str, list[list[np.ndarray]]] = {t: [] for t in self.state}
        grads: dict[str, list[list[np.ndarray]]] = {t: [] for t in self.state}
        for core, act, act_at, target in zip(batch, acts, at, targets, strict=True):
            for table in self.state:
                ids[table].append([])
                grads[table].append([])
            for feature, config in self.emb.feature_to_config_dict.items():
                x, table = core[feature], config.table_id
                if self.linear_loss:
                    loss += float(np.sum(act[feature].astype(np.float64) * target[feature]))
                    d_act = target[feature]
                else:
                    error = (act[feature] - target[feature]).astype(np.float64)
                    loss += 0.5 * float(np.sum(error**2))
                    d_act = act_at[feature] - target[feature]
                kept, slots, scale, n_slots = self._lookup_plan(feature, x)
                ids[table][-1].append(x.ids[kept])
                grads[table][-1].append(scale[:, None] * d_act.reshape(n_slots, -1)[slots])
        return acts, loss, ids, grads

    def step(
        self,
        batch: Batch,
        targets: Sequence[Mapping[str, np.ndarray]],
        learning_rates: Mapping[str, float],
        backprop_from: Sequence[Mapping[str, np.ndarray]] | None = None,
    ) -> tuple[list[dict[str, np.ndarray]], float]:
        """Runs one training step; returns each core's activations and the loss.

        `backprop_from`: as for `forward_backward`.
        """
        acts, loss, ids, grads = self._per_core(batch, targets, backprop_from)
        for table, st in self.state.items():
            params = table_params(self.emb, table)
            table_ids, table_grads = ids[table], grads[table]
            if params.use_gradient_accumulation:
                table_ids, table_grads = zip(*map(_core_sum, table_ids, table_grads), strict=True)
            self.state[table] = Slots(
                *adam_update(
                    st.w, st.m, st.v, np.concatenate([np.concatenate(c) for c in table_ids]),
                    np.concatenate([np.concatenate(c) for c in table_grads]),
                    params, learning_rates[table],
                )
            )
        return acts, loss


def random_state(emb: tpu_embedding.TPUEmbedding, seed: int) -> dict[str, Slots]:
    """Random tables and Adam slots (v >= 0) for every table of `emb`."""
    rng = np.random.default_rng(seed)
    out = {}
    for table, config in emb.table_to_config_dict.items():
        shape = (config.vocabulary_size, config.dimension)
        out[table] = Slots(
            rng.normal(size=shape).astype(np.float32),
            rng.normal(size=shape).astype(np.float32),
            rng.uniform(0.0, 2.0, size=shape).astype(np.float32),
        )
    return out


def assert_state_equal(got: Mapping[str, Slots], want: Mapping[str, Slots]) -> None:
    """Every table and slot bit for bit."""
    assert got.keys() == want.keys()
    for table in want:
        for slot in ("w", "m", "v"):
            np.testing.assert_array_equal(
                getattr(got[table], slot), getattr(want[table], slot), err_msg=f"{table} {slot}"
            )
