"""`ft.models.family_names`, the families the CLI offers before any family is imported,
agrees with the registry `ft.models.families` fills."""

from ft.models.family import FAMILIES, get_family
from ft.models.family_names import SHIPPED_FAMILIES, family_names


def test_shipped_family_names_are_the_registered_families():
    assert sorted(SHIPPED_FAMILIES) == FAMILIES.names()


def test_each_example_arch_is_an_arch_of_its_family():
    for name, arch in SHIPPED_FAMILIES.items():
        assert arch in get_family(name).archs, name


def test_family_names_cover_every_registered_family():
    assert sorted(family_names()) == FAMILIES.names()
