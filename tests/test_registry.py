"""`Registry`: duplicates are bugs, unknown names are user errors that list the choices."""

import pytest

from ft.errors import ConfigError
from ft.registry import Registry


@pytest.fixture
def colors():
    registry: Registry[int] = Registry("color")
    registry.register("red", 1)
    registry.register("green", 2)
    return registry


def test_register_and_get(colors):
    assert colors.get("red") == 1
    assert colors.names() == ["green", "red"]
    assert colors.items() == [("green", 2), ("red", 1)]
    assert "red" in colors and "blue" not in colors
    assert list(colors) == ["green", "red"] and len(colors) == 2


def test_registering_a_name_twice_is_a_bug(colors):
    with pytest.raises(ValueError, match="color 'red' is already registered"):
        colors.register("red", 3)
    assert colors.get("red") == 1


def test_unknown_name_lists_the_choices_and_the_closest(colors):
    with pytest.raises(ConfigError, match=r"^unknown color 'gren' \(did you mean 'green'\?\); registered: green, red$"):
        colors.get("gren")


def test_unknown_name_without_a_close_one_still_lists_the_choices(colors):
    with pytest.raises(ConfigError) as info:
        colors.get("zzzzzz")
    assert str(info.value) == "unknown color 'zzzzzz'; registered: green, red"


def test_unknown_name_names_the_key(colors):
    with pytest.raises(ConfigError, match=r"^config key 'paint': unknown color 'rd' \(did you mean 'red'\?\)"):
        colors.get("rd", key="paint")


def test_unhashable_name_is_a_config_error_not_a_crash(colors):
    with pytest.raises(ConfigError, match="unknown color"):
        colors.get(["red"])


def test_unregister(colors):
    colors.unregister("red")
    assert colors.names() == ["green"]
    colors.unregister("red")  # absent: no error
