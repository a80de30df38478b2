"""AdamParameters against TF 2.15.1's own class: signature, validation, value semantics."""

import copy
import inspect
import json
import math
import pickle

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from tensorflow.python.tpu import tpu_embedding as tf_tpu_embedding

import tpu_embed_adam
from tpu_embed_adam import AdamParameters, DynamicLearningRate

TFAdam = tf_tpu_embedding.AdamParameters


def test_signature_is_tf_then_keyword_only_layout_hints():
    ours = list(inspect.signature(AdamParameters).parameters.values())
    theirs = list(inspect.signature(TFAdam).parameters.values())
    assert ours[: len(theirs)] == theirs
    hints = ours[len(theirs):]
    assert [p.name for p in hints] == [
        "hot_id_replication_status", "low_dimensional_packing_status"]
    assert all(p.kind is p.KEYWORD_ONLY and p.default is None for p in hints)


def test_is_instance_of_tf_class_with_tf_attributes():
    params = AdamParameters(0.1)
    reference = TFAdam(0.1)
    assert isinstance(params, TFAdam)
    assert vars(reference).keys() <= set(dir(params))
    for name in vars(reference):
        assert getattr(params, name) == getattr(reference, name), name


# Values that probe every branch of both validators.
_ANY = st.sampled_from(
    [None, True, False, 0, 1, -1, 0.0, 0.5, 1.0, 1.5, -0.1, 1e-8, 2.0, float("nan"),
     float("inf"), -float("inf"), "x", "0", np.float32(0.5), np.bool_(True)]
)
_NAMES = [p for p in inspect.signature(TFAdam).parameters]
_HINTS = dict(hot_id_replication_status="MIGRATION_ONLY", low_dimensional_packing_status="ENABLED")


def _decision(cls, kwargs):
    try:
        cls(**kwargs)
    except (TypeError, ValueError):
        return False
    return True


@settings(max_examples=400, deadline=None)
@given(
    learning_rate=st.one_of(_ANY, st.floats(allow_nan=True)),
    overrides=st.dictionaries(st.sampled_from(_NAMES[1:]), _ANY, max_size=5),
)
def test_rejects_everything_tf_rejects(learning_rate, overrides):
    kwargs = {"learning_rate": learning_rate, **overrides}
    if not _decision(TFAdam, kwargs):
        assert not _decision(AdamParameters, kwargs), kwargs
    if _decision(AdamParameters, kwargs):
        assert _decision(TFAdam, kwargs), kwargs


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        # Cases TF rejects too.
        (dict(learning_rate=0.1, beta1=1.0), ValueError, r"`beta1`.*1\.0"),
        (dict(learning_rate=0.1, beta2=-0.1), ValueError, r"`beta2`.*-0\.1"),
        (dict(learning_rate=0.1, epsilon=0.0), ValueError, r"`epsilon`.*0\.0"),
        (dict(learning_rate=0.1, lazy_adam=False, use_gradient_accumulation=False),
         ValueError, r"`lazy_adam`.*use_gradient_accumulation=False"),
        (dict(learning_rate=0.1, use_gradient_accumulation=False, clip_gradient_max=1.0),
         ValueError, r"`clip_gradient_min`/`clip_gradient_max`"),
        (dict(learning_rate=0.1, beta1="a"), TypeError, r"`beta1`.*'a'"),
        # Stricter than TF.
        (dict(learning_rate=-1.0), ValueError, r"`learning_rate`.*-1\.0"),
        (dict(learning_rate=0.0), ValueError, r"`learning_rate`.*0\.0"),
        (dict(learning_rate=float("nan")), ValueError, r"`learning_rate`.*nan"),
        (dict(learning_rate="abc"), TypeError, r"`learning_rate`.*'abc'"),
        (dict(learning_rate=True), TypeError, r"`learning_rate`.*True"),
        (dict(learning_rate=0.1, beta1=float("nan")), ValueError, r"`beta1`.*nan"),
        (dict(learning_rate=0.1, epsilon=float("inf")), ValueError, r"`epsilon`.*inf"),
        (dict(learning_rate=0.1, sum_inside_sqrt="x"), TypeError, r"`sum_inside_sqrt`.*'x'"),
        (dict(learning_rate=0.1, lazy_adam=1), TypeError, r"`lazy_adam`.*1"),
        (dict(learning_rate=0.1, use_gradient_accumulation="0"), TypeError,
         r"`use_gradient_accumulation`.*'0'"),
        (dict(learning_rate=0.1, clip_weight_min=1.0, clip_weight_max=-1.0), ValueError,
         r"`clip_weight_min`.*1\.0 > -1\.0"),
        (dict(learning_rate=0.1, clip_gradient_min=2.0, clip_gradient_max=1.0), ValueError,
         r"`clip_gradient_min`.*2\.0 > 1\.0"),
        (dict(learning_rate=0.1, clip_weight_max=float("inf")), ValueError,
         r"`clip_weight_max`.*None"),
        (dict(learning_rate=0.1, weight_decay_factor=-0.5), ValueError,
         r"`weight_decay_factor`.*-0\.5"),
        (dict(learning_rate=0.1, multiply_weight_decay_factor_by_learning_rate=True),
         ValueError, r"`multiply_weight_decay_factor_by_learning_rate`.*`weight_decay_factor`"),
        (dict(learning_rate=1e39), ValueError, r"`learning_rate`.*float32.*1e\+39"),
        (dict(learning_rate=1e-50), ValueError, r"`learning_rate`.*float32.*1e-50"),
        # Subnormal in float32: flushed to 0 where the update runs.
        (dict(learning_rate=1e-40), ValueError,
         r"`learning_rate` must be a normal float32, at least 1\.175e-38.*1e-40"),
        (dict(learning_rate=1e-38), ValueError, r"`learning_rate` must be a normal float32"),
        (dict(learning_rate=0.1, beta2=0.99999999), ValueError, r"`beta2`.*float32"),
        (dict(learning_rate=0.1, epsilon=1e-50), ValueError, r"`epsilon`.*float32"),
        # Representable, but epsilon^2 underflows (or is subnormal) in float32.
        (dict(learning_rate=0.1, epsilon=1e-23), ValueError,
         r"`epsilon` vanishes in float32.*epsilon\^2.*1e-23"),
        (dict(learning_rate=0.1, epsilon=1e-20), ValueError, r"`epsilon` vanishes"),
        (dict(learning_rate=0.1, epsilon=1e-39, sum_inside_sqrt=False), ValueError,
         r"`epsilon` vanishes in float32: with sum_inside_sqrt=False, epsilon must"),
        # Beyond any float: a ValueError naming the argument, not OverflowError.
        (dict(learning_rate=10**400), ValueError, r"`learning_rate` must be finite"),
        (dict(learning_rate=0.1, clip_weight_max=-(10**400)), ValueError,
         r"`clip_weight_max` must be finite"),
        (dict(learning_rate=0.1, clip_gradient_max=1e39), ValueError,
         r"`clip_gradient_max`.*float32"),
        (dict(learning_rate=0.1, weight_decay_factor=0.0,
              multiply_weight_decay_factor_by_learning_rate=True),
         ValueError, r"`multiply_weight_decay_factor_by_learning_rate`.*or 0"),
        (dict(learning_rate=0.1, weight_decay_factor=0.1,
              multiply_weight_decay_factor_by_learning_rate="yes"),
         TypeError, r"`multiply_weight_decay_factor_by_learning_rate`.*'yes'"),
        # The layout hints: None or a name of the proto's enum, but UNSPECIFIED (None).
        (dict(learning_rate=0.1, hot_id_replication_status="enabled"), ValueError,
         r"`hot_id_replication_status` must be None \(UNSPECIFIED\) or one of "
         r"\('ENABLED', 'DISABLED', 'MIGRATION_ONLY'\); received: 'enabled'"),
        (dict(learning_rate=0.1, low_dimensional_packing_status="MIGRATION_ONLY"), ValueError,
         r"`low_dimensional_packing_status`.*'MIGRATION_ONLY'"),
        (dict(learning_rate=0.1, low_dimensional_packing_status="UNSPECIFIED"), ValueError,
         r"`low_dimensional_packing_status` must be None \(UNSPECIFIED\)"),
        (dict(learning_rate=0.1, low_dimensional_packing_status=True), TypeError,
         r"`low_dimensional_packing_status`.*True \(bool\)"),
        (dict(learning_rate=0.1, hot_id_replication_status=1), TypeError,
         r"`hot_id_replication_status`.*1 \(int\)"),
    ],
)
def test_errors_name_argument_and_value(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        AdamParameters(**kwargs)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(learning_rate=-1.0), "learning_rate"),
        (dict(learning_rate=float("nan")), "learning_rate"),
        (dict(learning_rate=1e-40), "learning_rate"),
        (dict(learning_rate=0.1, clip_weight_min=1.0, clip_weight_max=-1.0), "clip_weight_min"),
        (dict(learning_rate=0.1, weight_decay_factor=-0.5), "weight_decay_factor"),
        (dict(learning_rate=0.1, sum_inside_sqrt="x"), "sum_inside_sqrt"),
        (dict(learning_rate=0.1, epsilon=1e-23), "epsilon"),
    ],
)
def test_stricter_cases_are_accepted_by_tf(kwargs, name):
    # The point of the stricter checks: TF takes these silently.
    TFAdam(**kwargs)
    with pytest.raises((TypeError, ValueError), match=f"Argument `{name}`"):
        AdamParameters(**kwargs)


def test_smallest_normal_learning_rate_is_accepted_and_round_trips():
    smallest = float(np.finfo(np.float32).tiny)
    params = AdamParameters(smallest)
    assert AdamParameters.from_proto(params.to_proto()).learning_rate == float(
        str(np.float32(smallest)))
    with pytest.raises(ValueError, match="`learning_rate` must be a normal float32"):
        AdamParameters(float(np.nextafter(np.float32(smallest), np.float32(0))))


def test_zero_weight_decay_is_no_decay_and_round_trips():
    params = AdamParameters(0.1, weight_decay_factor=0.0)
    assert params.weight_decay_factor is None and params == AdamParameters(0.1)
    assert AdamParameters.from_proto(params.to_proto()) == params


def test_numpy_scalars_are_normalised():
    params = AdamParameters(np.float32(0.5), beta1=np.float64(0.8), lazy_adam=np.bool_(False))
    assert type(params.learning_rate) is float and params.learning_rate == 0.5
    assert type(params.lazy_adam) is bool and params.lazy_adam is False


def test_immutable_and_replace():
    params = AdamParameters(0.1)
    with pytest.raises(AttributeError, match=r"immutable.*replace\(beta1="):
        params.beta1 = 0.5
    with pytest.raises(AttributeError, match="immutable"):
        del params.beta1
    changed = params.replace(beta1=0.5, clip_weight_max=2.0)
    assert (changed.beta1, changed.clip_weight_max, params.beta1) == (0.5, 2.0, 0.9)
    with pytest.raises(ValueError, match="`beta1`"):
        params.replace(beta1=2.0)
    with pytest.raises(TypeError, match="unknown argument.*'beta_1'"):
        params.replace(beta_1=0.5)


_FULL = AdamParameters(
    0.05, beta1=0.8, beta2=0.99, epsilon=1e-6, lazy_adam=False, sum_inside_sqrt=False,
    clip_weight_min=-2.0, clip_weight_max=2.0, weight_decay_factor=0.01,
    multiply_weight_decay_factor_by_learning_rate=True, clip_gradient_min=-1.0,
    clip_gradient_max=1.0,
)


@pytest.mark.parametrize("params", [AdamParameters(0.1), _FULL,
                                    AdamParameters(DynamicLearningRate(3)),
                                    _FULL.replace(**_HINTS)])
def test_value_semantics_round_trips(params):
    assert params == copy.deepcopy(params) == pickle.loads(pickle.dumps(params))
    assert hash(params) == hash(copy.copy(params))
    assert eval(repr(params), {"tpu_embed_adam": tpu_embed_adam}) == params
    assert AdamParameters.from_dict(params.to_dict()) == params
    assert AdamParameters.from_json(params.to_json()) == params
    assert json.loads(params.to_json()) == params.to_dict()
    assert params != params.replace(beta2=0.5)
    assert params != params.replace(hot_id_replication_status="DISABLED")
    assert AdamParameters.from_proto(params.to_proto()) == params
    copied = copy.deepcopy(params)
    with pytest.raises(AttributeError, match="immutable"):
        copied.beta1 = 0.0


def test_equality_and_hash_by_value():
    assert AdamParameters(0.1) == AdamParameters(0.1, beta1=0.9)
    assert len({AdamParameters(0.1), AdamParameters(0.1), AdamParameters(0.2)}) == 2
    assert AdamParameters(0.1) != TFAdam(0.1)


def test_to_dict_keys_are_argument_names():
    assert list(_FULL.to_dict()) == list(inspect.signature(TFAdam).parameters)
    # The hints only when set: without them, the dict and JSON are TF's 13 names.
    with_hints = _FULL.replace(**_HINTS).to_dict()
    assert list(with_hints) == list(inspect.signature(AdamParameters).parameters)
    assert {k: with_hints[k] for k in _HINTS} == _HINTS
    one_hint = _FULL.replace(low_dimensional_packing_status="DISABLED").to_dict()
    assert list(one_hint) == [*inspect.signature(TFAdam).parameters,
                              "low_dimensional_packing_status"]


def test_layout_hints_are_kept_by_replace_and_shown_by_repr():
    params = AdamParameters(0.1, **_HINTS)
    assert params.replace(beta1=0.5).hot_id_replication_status == "MIGRATION_ONLY"
    assert params.replace(hot_id_replication_status=None) == AdamParameters(
        0.1, low_dimensional_packing_status="ENABLED")
    assert repr(params) == (
        "tpu_embed_adam.AdamParameters(learning_rate=0.1, "
        "hot_id_replication_status='MIGRATION_ONLY', low_dimensional_packing_status='ENABLED')")
    with pytest.raises(AttributeError, match="immutable"):
        params.hot_id_replication_status = None
    with pytest.raises(TypeError, match="unknown argument.*'hot_id_replication'"):
        params.replace(hot_id_replication="ENABLED")
    with pytest.raises(TypeError):
        AdamParameters(0.1, 0.9, 0.999, 1e-8, True, True, True, None, None, None, None, None,
                       None, "ENABLED")  # keyword-only
    assert AdamParameters(DynamicLearningRate(2)).to_dict()["learning_rate"] == {
        "dynamic_tag": 2
    }


@pytest.mark.parametrize(
    "config, error, pattern",
    [
        ({"learning_rate": 0.1, "beta_1": 0.9}, TypeError, r"unknown argument.*'beta_1'"),
        ({"beta1": 0.9}, ValueError, "no `learning_rate`"),
        ({"learning_rate": "0.1"}, TypeError, "`learning_rate`"),
        ({"learning_rate": {"tag": 1}}, ValueError, "dynamic_tag"),
        ({"learning_rate": {"dynamic_tag": -1}}, ValueError, "`tag`"),
        ([("learning_rate", 0.1)], TypeError, "`config` must be a dict"),
        # Keys of several types: named, not a comparison error from sorting them.
        ({1: 0.1, "beta1": 0.9}, TypeError,
         r"`config` must have argument names \(strings\) as keys; received: 1 \(int\)\.$"),
        ({1: 0.1, (2,): 0.9, "x": 1}, TypeError, r"received: 1 \(int\), \(2,\) \(tuple\)\.$"),
        ({"learning_rate": [0.1]}, TypeError,
         r"`learning_rate` must be a single value.*not a list; received: \[0\.1\]\.$"),
    ],
)
def test_from_dict_errors(config, error, pattern):
    with pytest.raises(error, match=pattern):
        AdamParameters.from_dict(config)


def _nested(depth, inner=0.5):
    for _ in range(depth):
        inner = [inner]
    return inner


@pytest.mark.parametrize(
    "config, name",
    [
        ({"learning_rate": _nested(100_000)}, "learning_rate"),
        ({"learning_rate": 0.1, "beta1": _nested(100_000)}, "beta1"),
        ({"learning_rate": 0.1, "lazy_adam": _nested(100_000)}, "lazy_adam"),
        ({"learning_rate": 0.1, "hot_id_replication_status": _nested(100_000)},
         "hot_id_replication_status"),
        ({"learning_rate": 0.1, "beta2": {"x": _nested(100_000)}}, "beta2"),
        ({"learning_rate": {"dynamic_tag": _nested(100_000)}},
         r"config\['learning_rate'\]\['dynamic_tag'\]"),
    ],
)
def test_from_dict_refuses_deep_nesting_naming_the_argument(config, name):
    with pytest.raises(TypeError, match=rf"^Argument `{name}` must be a single value") as error:
        AdamParameters.from_dict(config)
    assert len(str(error.value)) < 300


def test_deep_nesting_in_messages_is_shortened():
    deep = {"learning_rate": {"dynamic_tag": 1, "x": _nested(100_000)}}
    with pytest.raises(ValueError, match=r"as a dict must be .*; received: \{'dynamic_tag': 1, "):
        AdamParameters.from_dict(deep)
    # Within json's own depth limit, but deep enough to fail a repr.
    text = '{"learning_rate": 0.1, "beta1": ' + "[" * 900 + "]" * 900 + "}"
    with pytest.raises(TypeError, match="`beta1` must be a single value"):
        AdamParameters.from_json(text)


def test_false_multiply_flag_is_none_and_round_trips_every_form():
    # The proto holds only True: False and None both read back as None.
    for decay in (0.25, None):
        params = AdamParameters(0.1, weight_decay_factor=decay,
                                multiply_weight_decay_factor_by_learning_rate=False)
        assert params.multiply_weight_decay_factor_by_learning_rate is None
        assert params == AdamParameters(0.1, weight_decay_factor=decay)
        assert params.to_dict()["multiply_weight_decay_factor_by_learning_rate"] is None
        assert AdamParameters.from_proto(params.to_proto()) == params
        assert AdamParameters.from_tf_proto(params.to_tf_proto()) == params
        assert AdamParameters.from_json(params.to_json()) == params
        assert AdamParameters.from_dict(params.to_dict()) == params
        assert AdamParameters.from_tpu_embedding_v2(params.to_tpu_embedding_v2()) == params
        assert params.replace(beta1=0.5).multiply_weight_decay_factor_by_learning_rate is None
    flagged = AdamParameters(0.1, weight_decay_factor=0.25,
                             multiply_weight_decay_factor_by_learning_rate=np.bool_(False))
    assert flagged.multiply_weight_decay_factor_by_learning_rate is None
    assert AdamParameters.from_json(
        '{"learning_rate": 0.1, "weight_decay_factor": 0.25, '
        '"multiply_weight_decay_factor_by_learning_rate": false}'
    ) == AdamParameters(0.1, weight_decay_factor=0.25)


@pytest.mark.parametrize(
    "text, error, pattern",
    [("{not json", ValueError, "not valid JSON"),
     ("[1, 2]", TypeError,
      r"`text` must be a JSON object of argument names; received: \[1, 2\] \(a JSON array\)\.$"),
     ("null", TypeError, r"received: None \(a JSON null\)"),
     ('"0.1"', TypeError, r"received: '0\.1' \(a JSON string\)"),
     ('{"learning_rate": 0.1, "lazy_adam": "yes"}', TypeError, "`lazy_adam`"),
     # Numbers and nesting that json or float() cannot hold.
     ('{"learning_rate": 1' + "0" * 400 + "}", ValueError, "`learning_rate` must be finite"),
     ('{"learning_rate": ' + "1" * 5000 + "}", ValueError, "`text` is not valid JSON"),
     ("[" * 100_000 + "]" * 100_000, ValueError, "`text` is not valid JSON: RecursionError"),
     ('{"learning_rate": 0.1, "beta1": ' + "[" * 20_000 + "]" * 20_000 + "}", ValueError,
      "`text` is not valid JSON: RecursionError")],
)
def test_from_json_errors(text, error, pattern):
    with pytest.raises(error, match=pattern):
        AdamParameters.from_json(text)


def test_dynamic_learning_rate_validation():
    with pytest.raises(TypeError, match="`tag`"):
        DynamicLearningRate(1.5)
    with pytest.raises(TypeError, match="`tag`"):
        DynamicLearningRate(True)
    assert DynamicLearningRate(np.int64(4)).tag == 4


def _feature_columns():
    column = tf.compat.v1.tpu.experimental.embedding_column(
        tf.compat.v1.feature_column.categorical_column_with_identity("ids", 100), dimension=8
    )
    return [column]


def test_embedding_config_spec_accepts_it():
    params = AdamParameters(0.1, clip_gradient_max=1.0)
    spec = tf.compat.v1.estimator.tpu.experimental.EmbeddingConfigSpec(
        feature_columns=_feature_columns(), optimization_parameters=params
    )
    assert spec.optimization_parameters is params


def test_tpu_estimator_accepts_it(tmp_path):
    params = AdamParameters(0.1)
    spec = tf.compat.v1.estimator.tpu.experimental.EmbeddingConfigSpec(
        feature_columns=_feature_columns(), optimization_parameters=params
    )
    estimator = tf.compat.v1.estimator.tpu.TPUEstimator(
        model_fn=lambda features, labels, mode, params: None,
        config=tf.compat.v1.estimator.tpu.RunConfig(model_dir=str(tmp_path)),
        use_tpu=False,
        train_batch_size=8,
        embedding_config_spec=spec,
    )
    kept = estimator._ctx._embedding_config_spec.optimization_parameters
    assert kept == params and isinstance(kept, AdamParameters)


def test_tpu_embedding_accepts_it():
    tables = {"t": tf_tpu_embedding.TableConfig(16, 4)}
    features = {"f": tf_tpu_embedding.FeatureConfig("t")}
    with tf.Graph().as_default():
        embedding = tf_tpu_embedding.TPUEmbedding(
            tables, features, 4, tf_tpu_embedding.TRAINING, master=None,
            optimization_parameters=AdamParameters(0.1),
            device_config=tf_tpu_embedding.DeviceConfig(1, 1, "/job:worker"),
        )
        assert embedding.optimization_parameters == AdamParameters(0.1)
        assert math.isclose(
            embedding.config_proto.table_descriptor[0].optimization_parameters
            .learning_rate.constant, 0.1, rel_tol=1e-7)
