import pytest

from lesiondiffusion.labels import UnknownOrganError, convert_ids, is_hollow, label_table, normalize_name


@pytest.mark.parametrize("name", ["urinary bladder", "urinary_bladder", "Urinary-Bladder", "bladder", "BLADDER", 104, "104"])
def test_bladder_spellings_resolve_in_v1(name):
    assert label_table("v1").id(name) == 104


def test_v2_numbering_differs_and_converts():
    v1, v2 = label_table("v1"), label_table("v2")
    assert v2.id("bladder") == 21
    assert v2.id("pancreas") == 7 and v1.id("pancreas") == 10
    assert len(v1.names) == 104 and len(v2.names) == 117
    mapping = convert_ids("v2", "v1")
    assert mapping[21] == 104 and mapping[5] == 5
    assert 116 not in mapping  # sternum has no v1 label


def test_synonym_column_and_aliases():
    t = label_table("v1")
    assert t.id("small intestine") == 55
    assert t.id("hepatic portal vein") == 9
    assert t.id("left kidney") == 3
    assert t.ids("hip bone") == (90, 91)  # a synonym shared by left and right is a group


def test_group_word_is_several_ids_and_ambiguous_for_id():
    t = label_table("v1")
    assert t.ids("kidney") == (2, 3)
    assert set(t.ids("lung")) == {13, 14, 15, 16, 17}
    with pytest.raises(UnknownOrganError, match="ambiguous.*kidney right, kidney left"):
        t.id("kidney")


def test_unknown_name_lists_close_matches():
    with pytest.raises(UnknownOrganError) as e:
        label_table().id("livr")
    assert "close matches: liver" in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_id_and_version():
    with pytest.raises(UnknownOrganError, match="999"):
        label_table().name(999)
    with pytest.raises(Exception, match="v3"):
        label_table("v3")


def test_names_and_hollow_organs():
    assert normalize_name(" Kidney_Left ") == "kidney left"
    assert label_table().name(5) == "liver"
    assert is_hollow("bladder") and is_hollow("stomach") and is_hollow("gall bladder")
    assert not is_hollow("liver")
