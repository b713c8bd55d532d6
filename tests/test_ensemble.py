from __future__ import annotations

import dataclasses
import functools
import pickle

import numpy as np
import pytest

from colocate import Ensemble, InputSpec, InvalidInputError, Member, ModelLoadError
from colocate.ensemble import majority_vote, mean_probs, softmax, weighted_mean


def _identity_factory() -> object:  # never called in these tests
    raise AssertionError("not loaded")


def make_member(name: str = "a", **kwargs: object) -> Member:
    fields: dict[str, object] = {
        "backend": "torch",
        "source": _identity_factory,
        "input": InputSpec((-1, 4)),
    }
    fields.update(kwargs)
    return Member(name=name, **fields)  # type: ignore[arg-type]


# --- combine rules on hand-made inputs ----------------------------------------


def test_softmax_known_values() -> None:
    out = softmax(np.array([[0.0, np.log(3.0)]]))
    np.testing.assert_allclose(out, [[0.25, 0.75]])


def test_mean_probs_known_values() -> None:
    a = np.array([[1.0, 0.0], [0.5, 0.5]])
    b = np.array([[0.0, 1.0], [0.1, 0.9]])
    np.testing.assert_allclose(mean_probs([a, b]), [[0.5, 0.5], [0.3, 0.7]])


def test_weighted_mean_normalises_weights() -> None:
    a = np.array([[1.0, 0.0]])
    b = np.array([[0.0, 1.0]])
    np.testing.assert_allclose(weighted_mean([a, b], [3.0, 1.0]), [[0.75, 0.25]])
    np.testing.assert_allclose(weighted_mean([a, b], [0.3, 0.1]), [[0.75, 0.25]])


def test_majority_vote_counts_and_breaks_ties_to_lowest_class() -> None:
    m1 = np.array([[0.9, 0.1, 0.0], [0.1, 0.1, 0.8]])
    m2 = np.array([[0.2, 0.7, 0.1], [0.1, 0.1, 0.8]])
    m3 = np.array([[0.6, 0.3, 0.1], [0.1, 0.8, 0.1]])
    shares = majority_vote([m1, m2, m3])
    np.testing.assert_allclose(shares, [[2 / 3, 1 / 3, 0.0], [0.0, 1 / 3, 2 / 3]])
    tie = majority_vote([np.array([[0.1, 0.9]]), np.array([[0.9, 0.1]])])
    assert int(tie.argmax(axis=1)[0]) == 0


def test_ensemble_combines_logits_through_softmax() -> None:
    ens = Ensemble((make_member("a"), make_member("b", output="probs")))
    logits_a = np.array([[0.0, np.log(3.0)]])
    probs_b = np.array([[0.75, 0.25]])
    np.testing.assert_allclose(ens.combine_outputs({"a": logits_a, "b": probs_b}), [[0.5, 0.5]])


def test_ensemble_vote_and_weighted_rules() -> None:
    members = (make_member("a"), make_member("b"), make_member("c"))
    outs = {
        "a": np.array([[5.0, 0.0]]),
        "b": np.array([[5.0, 0.0]]),
        "c": np.array([[0.0, 5.0]]),
    }
    vote = Ensemble(members, combine="vote").combine_outputs(outs)
    np.testing.assert_allclose(vote, [[2 / 3, 1 / 3]])
    weighted = Ensemble(members, combine="weighted", weights=(0.0, 0.0, 1.0)).combine_outputs(outs)
    assert weighted[0, 1] > 0.99


@pytest.mark.parametrize("rule", ["mean", "weighted", "vote"])
def test_combining_in_one_stack_matches_each_member_turned_into_probabilities_first(rule: str) -> None:
    # combine_outputs stacks the outputs and runs one softmax over the logits members; the
    # result must be what each member's probabilities, combined one by one, give
    rng = np.random.default_rng(3)
    members = (
        make_member("a"),
        make_member("b", output="probs"),
        make_member("c"),
        make_member("d", output="probs"),
    )
    weights = (1.0, 2.0, 0.5, 3.0) if rule == "weighted" else None
    ens = Ensemble(members, combine=rule, weights=weights)
    outputs = {
        "a": rng.normal(size=(3, 5)).astype(np.float32),
        "b": softmax(rng.normal(size=(3, 5))),
        "c": 20.0 * rng.normal(size=(3, 5)),
        "d": softmax(rng.normal(size=(3, 5))).astype(np.float32),
    }
    before = {k: v.copy() for k, v in outputs.items()}
    probs = [ens.to_probs(m, outputs[m.name]) for m in members]
    expected = {"mean": mean_probs, "weighted": weighted_mean, "vote": majority_vote}[rule](probs, weights)
    np.testing.assert_allclose(ens.combine_outputs(outputs), expected, rtol=1e-12, atol=1e-15)
    for name, array in outputs.items():  # the members' outputs are left as they were
        np.testing.assert_array_equal(array, before[name])
    only_probs = Ensemble((members[1], members[3]), combine=rule, weights=(1.0, 1.0) if weights else None)
    reference = {"mean": mean_probs, "weighted": weighted_mean, "vote": majority_vote}[rule](
        [outputs["b"], outputs["d"].astype(np.float64)], (1.0, 1.0)
    )
    np.testing.assert_allclose(only_probs.combine_outputs(outputs), reference, rtol=1e-12)


def test_a_combine_callable_gets_a_list_of_each_members_probabilities() -> None:
    seen: list[object] = []

    def spy(probs: list[np.ndarray], weights: object) -> np.ndarray:
        seen.append(probs)
        return probs[1]

    ens = Ensemble((make_member("a"), make_member("b", output="probs")), combine=spy)
    out = ens.combine_outputs({"a": np.array([[0.0, 0.0]]), "b": np.array([[0.2, 0.8]])})
    np.testing.assert_allclose(out, [[0.2, 0.8]])
    (probs,) = seen
    assert isinstance(probs, list) and len(probs) == 2
    np.testing.assert_allclose(probs[0], [[0.5, 0.5]])


def test_ensemble_user_callable() -> None:
    def first_member(probs: list[np.ndarray], weights: object) -> np.ndarray:
        return probs[0]

    ens = Ensemble((make_member("a"), make_member("b")), combine=first_member)
    out = ens.combine_outputs({"a": np.array([[0.0, 0.0]]), "b": np.array([[9.0, 0.0]])})
    np.testing.assert_allclose(out, [[0.5, 0.5]])


# --- validation ---------------------------------------------------------------


def test_duplicate_names_rejected() -> None:
    with pytest.raises(InvalidInputError, match="duplicate member name 'a'"):
        Ensemble((make_member("a"), make_member("a")))


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"backend": "tensorflow"}, "member 'a': unknown backend 'tensorflow'"),
        ({"precision": "int3"}, "member 'a': unknown precision 'int3'"),
        ({"output": "scores"}, "member 'a': output must be"),
        ({"backend": "cupy", "source": 42}, "member 'a': backend 'cupy' needs a callable"),
        ({"backend": "onnxruntime", "source": _identity_factory}, "loads from a file"),
    ],
)
def test_member_validation(kwargs: dict[str, object], pattern: str) -> None:
    with pytest.raises(InvalidInputError, match=pattern):
        make_member("a", **kwargs)


def test_missing_model_file(tmp_path: object) -> None:
    with pytest.raises(ModelLoadError, match=r"member 'm': model file .*nope.onnx.* does not exist"):
        make_member("m", backend="onnxruntime", source=f"{tmp_path}/nope.onnx")


def test_bad_member_name() -> None:
    with pytest.raises(InvalidInputError, match="not valid"):
        make_member("bad name!")


@pytest.mark.parametrize(
    ("batch", "pattern"),
    [
        (np.zeros((2, 5), np.float32), r"member 'a': input shape \(2, 5\) does not match the spec \(B, 4\)"),
        (np.zeros((2, 4), np.float64), "member 'a': input dtype float64 does not match the spec float32"),
        (np.zeros((4,), np.float32), r"input shape \(4,\) does not match"),
        (np.zeros((0, 4), np.float32), r"input shape \(0, 4\) does not match"),
        ([[1.0] * 4], "input must be a numpy array, got list"),
    ],
)
def test_input_spec_check(batch: object, pattern: str) -> None:
    with pytest.raises(InvalidInputError, match=pattern):
        InputSpec((-1, 4)).check("a", batch)


def test_input_spec_pinned_batch_and_example() -> None:
    spec = InputSpec((2, 3), dtype="float32")
    spec.check("a", np.zeros((2, 3), np.float32))
    with pytest.raises(InvalidInputError):
        spec.check("a", np.zeros((3, 3), np.float32))
    ex = InputSpec((-1, 3)).example(5, seed=1)
    assert ex.shape == (5, 3) and ex.dtype == np.float32
    np.testing.assert_array_equal(ex, InputSpec((-1, 3)).example(5, seed=1))


@pytest.mark.parametrize("shape", [(), (0, 3), (-1, 0), (-2, 3)])
def test_input_spec_rejects_bad_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidInputError):
        InputSpec(shape)


def test_weights_validation() -> None:
    members = (make_member("a"), make_member("b"))
    with pytest.raises(InvalidInputError, match="1 weights for 2 members"):
        Ensemble(members, combine="weighted", weights=(1.0,))
    with pytest.raises(InvalidInputError, match="needs weights"):
        Ensemble(members, combine="weighted")
    with pytest.raises(InvalidInputError, match="unknown combine rule 'median'"):
        Ensemble(members, combine="median")
    with pytest.raises(InvalidInputError, match="has no members"):
        Ensemble(())


def test_combine_rejects_mismatched_outputs() -> None:
    ens = Ensemble((make_member("a"), make_member("b")))
    with pytest.raises(InvalidInputError, match="no output for member"):
        ens.combine_outputs({"a": np.zeros((1, 2))})
    with pytest.raises(InvalidInputError, match="differ in shape"):
        ens.combine_outputs({"a": np.zeros((1, 2)), "b": np.zeros((1, 3))})
    not_2d = r"member 'a': output shape \(1, 2, 3\) is not \(batch, classes\)"
    with pytest.raises(InvalidInputError, match=not_2d):
        ens.combine_outputs({"a": np.zeros((1, 2, 3)), "b": np.zeros((1, 2, 3))})
    with pytest.raises(InvalidInputError, match=r"member 'b': output shape \(2,\) is not"):
        ens.combine_outputs({"a": np.zeros((1, 2)), "b": np.zeros(2)})


def test_combine_takes_plain_sequences_and_the_ensemble_stays_a_plain_value() -> None:
    ens = Ensemble((make_member("a"), make_member("b", output="probs")))
    out = ens.combine_outputs({"a": [[0.0, 0.0]], "b": [[0.2, 0.8]]})  # lists, not arrays
    np.testing.assert_allclose(out, [[0.35, 0.65]])
    # what combining caches on the ensemble is not a field: equality, pickling and serde see the same
    assert [f.name for f in dataclasses.fields(ens)] == ["members", "combine", "weights", "name"]
    again = pickle.loads(pickle.dumps(ens))
    assert again == ens
    np.testing.assert_allclose(again.combine_outputs({"a": [[0.0, 0.0]], "b": [[0.2, 0.8]]}), out)


def test_member_pickles_with_partial_source() -> None:
    m = make_member("a", source=functools.partial(_identity_factory))
    assert pickle.loads(pickle.dumps(m)).name == "a"
    assert "_identity_factory" in m.describe()["source"]
