"""The armory.track semantics, each rule as its own test, through a real armoryd."""
from dataclasses import dataclass

import pytest

from armory_track import (
    Trackable, get_current_params, reset_params, track_call, track_init_params, track_param, track_params,
    trackable_context, tracking_context,
)


def load_model(name, batch_size=1, **kwargs):
    return name


def test_track_param_records_in_the_current_context(daemon):
    track_param("batch_size", 16)
    assert get_current_params() == {"batch_size": "16"}


def test_newer_value_overwrites(daemon):
    track_param("k", 1)
    track_param("k", 2)
    assert get_current_params() == {"k": "2"}


def test_values_are_python_str_and_dicts_flatten(daemon):
    track_param("flag", True)
    track_param("none", None)
    track_param("lr", 0.1)
    track_param("sizes", [1, 2])
    track_param("nested", {"a": 1, "b": {"c": "x"}})
    assert get_current_params() == {"flag": "True", "none": "None", "lr": "0.1", "sizes": "[1, 2]", "nested/a": "1", "nested/b/c": "x"}


def test_track_params_decorator_records_kwargs_and_func(daemon):
    @track_params
    def build(name, depth):
        return name

    assert build("pos", depth=3) == "pos"  # positional arguments are not recorded
    assert get_current_params() == {"build._func": f"{__name__}.test_track_params_decorator_records_kwargs_and_func.<locals>.build", "build.depth": "3"}


def test_track_params_with_prefix_and_ignore(daemon):
    @track_params(prefix="model", ignore=["secret"])
    def build(name, secret):
        return name

    build(name="x", secret="s")
    params = get_current_params()
    assert params["model.name"] == "x" and "model.secret" not in params and params["model._func"].endswith("build")


def test_a_second_call_removes_the_prefixs_old_keys(daemon):
    """The seeds' example: `load_model.name` is overwritten, `load_model.extra` is removed."""
    track_call(load_model, name="a", extra=True)
    track_call(load_model, name="b")
    assert get_current_params() == {"load_model._func": f"{__name__}.load_model", "load_model.name": "b"}


def test_track_init_params_uses_the_class_name(daemon):
    @track_init_params
    class TheDataset:
        def __init__(self, batch_size):
            self.batch_size = batch_size

    TheDataset(batch_size=32)
    params = get_current_params()
    assert params["TheDataset.batch_size"] == "32"
    assert params["TheDataset._func"].endswith("TheDataset.__init__")


def test_track_call_on_a_third_party_class(daemon):
    class ThirdParty:
        def __init__(self, alpha=1):
            self.alpha = alpha

    obj = track_call(ThirdParty, alpha=5)
    assert obj.alpha == 5
    assert get_current_params()["ThirdParty.alpha"] == "5"


def test_reset_params_clears_the_current_context(daemon):
    track_param("key", "value")
    reset_params()
    assert get_current_params() == {}


def test_tracking_context_is_isolated_and_nested_copies(daemon):
    """The seeds' tracking_context example."""
    track_param("global", "value")
    with tracking_context():
        assert get_current_params() == {}
        track_param("parent", "value")
        with tracking_context(nested=True):
            track_param("child", "value")
            assert get_current_params() == {"parent": "value", "child": "value"}
        assert get_current_params() == {"parent": "value"}
    assert get_current_params() == {"global": "value"}


def test_trackables_get_the_context_params_when_it_ends(daemon):
    class MyClass(Trackable):
        pass

    with trackable_context():
        track_param("key", "value")
        obj = MyClass()
        assert get_current_params() == {"key": "value"}
        assert obj.tracked_params == {}
    assert get_current_params() == {}
    assert obj.tracked_params == {"key": "value"}


def test_dataclass_trackables(daemon):
    @dataclass
    class Dataset(Trackable):
        name: str

    with trackable_context():
        track_param("split", "test")
        ds = Dataset(name="d")
    assert ds.name == "d" and ds.tracked_params == {"split": "test"}


def test_invalid_keys_are_raised_at_the_call_and_nothing_is_sent(daemon):
    import armory_track

    with pytest.raises(armory_track.ArmoryError) as raised:
        track_param("bad//key", 1)
    error = raised.value.errors[0]
    assert (error["code"], error["key"], error["failed_op"], error["seq"]) == ("INVALID_KEY", "bad//key", "param", None)
    assert "refused before sending" in str(raised.value)
    armory_track.flush()  # nothing was sent: nothing to raise at the sync point
