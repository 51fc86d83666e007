"""Asset cards: search order, @user overlays, base chains, path resolution, errors."""

import pytest

from ft.assets import AssetStore, card_types, list_cards, load_card, user_asset_dir
from ft.errors import AssetError


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    user, system = tmp_path / "user", tmp_path / "system"
    user.mkdir()
    system.mkdir()
    monkeypatch.setenv("FT_USER_ASSET_DIR", str(user))
    monkeypatch.setenv("FT_ASSET_DIR", str(system))
    return user, system


def test_multi_document_files_and_card_relative_paths(dirs):
    _, system = dirs
    (system / "sub").mkdir()
    (system / "sub" / "models.yaml").write_text(
        "name: a\nmodel_family: llama\ncheckpoint: weights/a\n---\nname: b\nmodel_family: llama\ncheckpoint: /abs/b\n"
    )
    a, b = load_card("a"), load_card("b")
    assert a.get("checkpoint") == str(system / "sub" / "weights" / "a")
    assert b.get("checkpoint") == "/abs/b"


def test_user_dir_is_searched_before_system_dirs(dirs):
    user, system = dirs
    (system / "s.yaml").write_text("name: m\nmodel_arch: from_system\n")
    (user / "u.yaml").write_text("name: m\nmodel_arch: from_user\n")
    assert load_card("m").get("model_arch") == "from_user"


def test_user_overlay_changes_only_its_fields(dirs):
    user, system = dirs
    (system / "s.yaml").write_text("name: m\nmodel_arch: x\ncheckpoint: hf://org/m\nmodel_config: {dim: 8, n_layers: 2}\n")
    (user / "u.yaml").write_text("name: m@user\ncheckpoint: ckpt\nmodel_config: {n_layers: 4}\n")
    card = load_card("m")
    assert card.get("model_arch") == "x"
    assert card.get("checkpoint") == str(user / "ckpt")
    assert card.get("model_config") == {"dim": 8, "n_layers": 4}
    assert [source.file for source in card.sources] == [system / "s.yaml", user / "u.yaml"]
    assert "m@user" not in AssetStore.default().names()


def test_base_chain_inherits_and_overrides(dirs):
    _, system = dirs
    (system / "s.yaml").write_text(
        "name: root\nmodel_family: llama\nmodel_arch: a\ntokenizer_family: llama3\n---\n"
        "name: mid\nbase: root\nmodel_arch: b\n---\nname: leaf\nbase: mid\ncheckpoint: /c\n"
    )
    leaf = load_card("leaf")
    assert (leaf.get("model_family"), leaf.get("model_arch"), leaf.get("checkpoint")) == ("llama", "b", "/c")
    assert [s.name for s in leaf.sources] == ["leaf", "mid", "root"]
    assert "base" not in leaf.fields


def test_overlay_of_a_base_applies_to_children(dirs):
    user, system = dirs
    (system / "s.yaml").write_text("name: root\nmodel_arch: a\n---\nname: leaf\nbase: root\n")
    (user / "u.yaml").write_text("name: root@user\nmodel_arch: z\n")
    assert load_card("leaf").get("model_arch") == "z"


def test_duplicate_names_in_one_directory_name_both_files(dirs):
    _, system = dirs
    (system / "one.yaml").write_text("name: dup\n")
    (system / "two.yaml").write_text("name: dup\n")
    with pytest.raises(AssetError, match=r"'dup' is defined twice .*one.yaml.*two.yaml"):
        load_card("dup")


def test_same_name_in_two_directories_is_not_an_error(dirs):
    user, system = dirs
    (system / "a.yaml").write_text("name: same\nmodel_arch: from_system\ncheckpoint: sys_ckpt\n")
    (user / "a.yaml").write_text("name: same\nmodel_arch: from_user\n")
    card = load_card("same")
    # The user's card replaces the system one whole (no merge: that is what `@user` is for).
    assert card.get("model_arch") == "from_user"
    assert card.get("checkpoint") is None
    assert [source.file for source in card.sources] == [user / "a.yaml"]


def test_base_cycle(dirs):
    _, system = dirs
    (system / "c.yaml").write_text("name: x\nbase: y\n---\nname: y\nbase: x\n")
    with pytest.raises(AssetError, match=r"cycle: x -> y -> x .*c.yaml"):
        load_card("x")


def test_missing_base_names_the_file(dirs):
    _, system = dirs
    (system / "m.yaml").write_text("name: x\nbase: nowhere\n")
    with pytest.raises(AssetError, match=r"card 'x' in .*m.yaml has base 'nowhere'"):
        load_card("x")


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("name: x\nmodel_config: 3\n", "field 'model_config' must be a dict"),
        ("name: x\ncheckpoint: [a]\n", "field 'checkpoint' must be a str"),
        ("name: 5\n", "field 'name' must be a str"),
        ("model_arch: a\n", "no 'name' field"),
        ("- a\n- b\n", "must be a mapping"),
        ("name: [x\n", "invalid YAML"),
    ],
)
def test_malformed_cards_name_the_file(dirs, text, fragment):
    _, system = dirs
    (system / "bad.yaml").write_text(text)
    with pytest.raises(AssetError) as error:
        list_cards()
    assert "bad.yaml" in str(error.value) and fragment in str(error.value)


def test_unknown_card_suggests_close_names(dirs):
    with pytest.raises(AssetError, match="did you mean 'llama3_2_1b'"):
        load_card("llama3_2_1")


def test_missing_checkpoint_says_how_to_overlay(dirs, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    card = load_card("llama3_2_1b")
    with pytest.raises(AssetError, match=r"not on this machine.*llama3_2_1b@user"):
        card.path("checkpoint")
    local = tmp_path / "local_ckpt"
    local.mkdir()
    (dirs[0] / "mine.yaml").write_text(f"name: llama3_2_1b@user\ncheckpoint: {local}\n")
    assert load_card("llama3_2_1b").path("checkpoint") == local


def test_hub_cache_snapshot_is_found(dirs, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    snapshot = tmp_path / "hf" / "hub" / "models--meta-llama--Llama-3.2-1B" / "snapshots" / "abc"
    (snapshot / "original").mkdir(parents=True)
    (snapshot / "original" / "tokenizer.model").write_text("x")
    card = load_card("llama3_2_1b")
    assert card.path("checkpoint") == snapshot
    assert card.path("tokenizer") == snapshot / "original" / "tokenizer.model"


def test_user_dir_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("FT_USER_ASSET_DIR", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert user_asset_dir() == tmp_path / "ft" / "assets"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_asset_dir() == tmp_path / "home" / ".config" / "ft" / "assets"


SYSTEM_LLAMAS = ["llama2_7b", "llama2_13b", "llama3_8b", "llama3_1_8b", "llama3_1_70b", "llama3_2_1b", "llama3_2_3b", "llama3_3_70b"]


def test_system_cards_cover_the_llama_archs(dirs):
    names = {card.name for card in list_cards("model")}
    for name in SYSTEM_LLAMAS:
        assert name in names
        card = load_card(name)
        assert card.get("model_family") == "llama"
        assert card.get("tokenizer_family") in ("llama2", "llama3")
        assert card.get("checkpoint")
    instruct = [n for n in names if n.endswith(("_instruct", "_chat"))]
    assert len(instruct) >= 8
    assert load_card("llama3_2_1b_instruct").get("use_eot") is True


def test_list_by_type(dirs):
    assert "ft_default_sft" in {c.name for c in list_cards("dataset")}
    assert "ft_default_sft" not in {c.name for c in list_cards("model")}
    assert card_types(load_card("ft_tiny")) == ["model", "tokenizer"]


def test_family_card_overlay_reaches_every_model_of_the_family(dirs, tmp_path):
    # fairseq2's tutorial card file, as written: the model's checkpoint, and the
    # tokenizer for every Llama 3 model through the family card.
    user, _ = dirs
    (user / "my_llama3_2_1b.yaml").write_text(
        'name: llama3_2_1b@user\ncheckpoint: "/models/Llama-3.2-1B/original/consolidated.00.pth"\n\n---\n\n'
        'name: llama3@user\ntokenizer: "/models/Llama-3.2-1B/original/tokenizer.model"\n'
    )
    for name in ("llama3_2_1b", "llama3_2_1b_instruct", "llama3_1_8b"):
        card = load_card(name)
        assert card.get("tokenizer") == "/models/Llama-3.2-1B/original/tokenizer.model"
        assert (card.get("model_family"), card.get("tokenizer_family")) == ("llama", "llama3")
    assert load_card("llama3_2_1b").get("checkpoint") == "/models/Llama-3.2-1B/original/consolidated.00.pth"
    # An overlay of a card reaches its children only where they do not set the field.
    assert load_card("llama3_2_1b_instruct").get("checkpoint") == "hf://meta-llama/Llama-3.2-1B-Instruct"
    assert load_card("llama3_2_1b").get("model_arch") == "llama3_2_1b"
    assert load_card("llama2_7b").get("tokenizer") == "hf://meta-llama/Llama-2-7b-hf/tokenizer.model"
    assert [s.name for s in load_card("llama3_2_1b").sources] == ["llama3_2_1b", "llama3_2_1b@user", "llama3", "llama3@user"]


def test_orphan_overlay_is_an_error_by_name_and_a_warning_in_assets_list(dirs, capsys, caplog):
    from ft.cli import main

    user, _ = dirs
    (user / "typo.yaml").write_text("name: llama3_2_1B@user\ncheckpoint: /x\n")
    with pytest.raises(AssetError, match=r"overlays card 'llama3_2_1B', but no card has that name; did you mean 'llama3_2_1b'"):
        load_card("llama3_2_1B@user")
    assert main(["assets", "list"]) == 0
    assert "warning: card 'llama3_2_1B@user'" in capsys.readouterr().out


def test_family_hub_tokenizer_is_found_in_the_models_own_checkpoint(dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    local = tmp_path / "Llama-3.1-8B"
    (local / "original").mkdir(parents=True)
    (local / "original" / "tokenizer.model").write_text("x")
    (dirs[0] / "mine.yaml").write_text(f"name: llama3_1_8b@user\ncheckpoint: {local}\n")
    assert load_card("llama3_1_8b").path("tokenizer") == local / "original" / "tokenizer.model"
    (dirs[0] / "mine.yaml").write_text(f"name: llama3_1_8b@user\ncheckpoint: {local}/original/consolidated.00.pth\n")
    (local / "original" / "consolidated.00.pth").write_text("x")
    assert load_card("llama3_1_8b").path("tokenizer") == local / "original" / "tokenizer.model"
