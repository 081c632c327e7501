"""`make bench`'s command line: what it cannot run is refused before any section starts."""

from __future__ import annotations

import pytest

from benchmarks.run import SECTIONS, parse


@pytest.mark.parametrize("argv", [["--sections", "stepp"], ["--sections", ","], ["--name", "a/b"], ["--name", ""],
                                  ["--name", ".hidden"]])
def test_a_section_or_results_name_it_cannot_use_is_refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2 and argv[1] in capsys.readouterr().err


def test_the_default_runs_every_section():
    a = parse([])
    assert a.sections.split(",") == list(SECTIONS) and a.name is None
