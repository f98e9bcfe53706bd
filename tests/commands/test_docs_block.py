"""The measured block a command writes into a Markdown page: replaced in place, appended once, refused when broken."""
from __future__ import annotations

import re

import pytest

from eigenfast.commands.docs_block import check_page, markers, measured, write_block
from eigenfast.errors import ArgumentError


def test_a_new_page_and_a_page_without_the_block_get_it_appended(tmp_path):
    begin, end = markers("t")
    new = tmp_path / "new.md"
    write_block(new, "t", "numbers 1")
    assert new.read_text() == f"{begin}\nnumbers 1\n{end}\n"
    page = tmp_path / "page.md"
    page.write_text("# Title\n\nProse.\n\n\n")
    write_block(page, "t", "numbers 1\n")
    assert page.read_text() == f"# Title\n\nProse.\n\n{begin}\nnumbers 1\n{end}\n"


def test_the_block_is_replaced_in_place_and_other_blocks_are_left_alone(tmp_path):
    page = tmp_path / "page.md"
    (a_begin, a_end), (b_begin, b_end) = markers("a"), markers("b")
    page.write_text(f"top\n{a_begin}\nold a\n{a_end}\nmiddle\n{b_begin}\nold b\n{b_end}\nbottom\n")
    write_block(page, "a", "new a\nsecond line")
    assert page.read_text() == f"top\n{a_begin}\nnew a\nsecond line\n{a_end}\nmiddle\n{b_begin}\nold b\n{b_end}\nbottom\n"
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize("text", ["{begin}\nno end\n", "{end}\n{begin}\n", "only the end {end}\n"])
def test_a_broken_block_is_refused_and_the_page_kept(tmp_path, text):
    begin, end = markers("t")
    page = tmp_path / "page.md"
    page.write_text(text.format(begin=begin, end=end))
    before = page.read_text()
    with pytest.raises(ArgumentError, match="broken block 't'"):
        write_block(page, "t", "numbers")
    assert page.read_text() == before


def test_a_folder_is_refused(tmp_path):
    with pytest.raises(ArgumentError, match="is a folder"):
        check_page(tmp_path, "t")


def test_the_measured_text_holds_the_command_the_date_the_load_and_the_output():
    text = measured(["eigenfast", "edges", "--model", "a b"], "col1 col2\n1 2\n\n", 12.4)
    assert text.startswith("```\neigenfast edges --model 'a b'\n```\n")  # quoted so it pastes into a shell
    assert re.search(r"Measured \d{4}-\d\d-\d\d \d\d:\d\d UTC in 12 s on cpu \(\d+ torch thread\(s\), \d+ cores; "
                     r"load average [\d.]+, [\d.]+, [\d.]+ at the end\)", text)
    assert text.endswith("```\ncol1 col2\n1 2\n```\n")
