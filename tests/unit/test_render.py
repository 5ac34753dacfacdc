"""The strict renderer: every placeholder filled or a PackageError naming it; nothing left behind."""

from __future__ import annotations

import pytest

from builder.errors import PackageError
from triton_repo.render import TEMPLATE_ROOT, placeholders, render_text, render_tree


def test_fills_placeholders_and_leaves_shell_syntax_alone():
    text = 'IMAGE="${IMAGE:-@@{image}}"\necho $(date) $HOME @@{n}'
    assert render_text(text, {"image": "nvcr.io/x:1", "n": 3}, name="t") == 'IMAGE="${IMAGE:-nvcr.io/x:1}"\necho $(date) $HOME 3'


def test_missing_value_names_the_placeholder():
    with pytest.raises(PackageError, match=r"@@\{model_path\} with no value"):
        render_text("model: @@{model_path}", {}, name="model.yaml")


@pytest.mark.parametrize("bad", ["a @@name b", "a @@{Bad-Name} b", "@@", "x @@{ spaced }"])
def test_malformed_placeholder_is_an_error(bad):
    with pytest.raises(PackageError):
        render_text(bad, {"name": 1, "Bad": 1}, name="t")


def test_value_that_reintroduces_a_placeholder_is_caught():
    with pytest.raises(PackageError, match="unfilled placeholder"):
        render_text("x: @@{a}", {"a": "@@{b}"}, name="t")


def test_every_shipped_template_renders_only_with_all_its_placeholders(tmp_path):
    """Each template's placeholder set is exact: dropping any one value fails."""
    templates = sorted(TEMPLATE_ROOT.rglob("*.tmpl"))
    assert len(templates) >= 5
    for t in templates:
        names = placeholders(t.read_text())
        values = {n: "v" for n in names}
        render_text(t.read_text(), values, name=t.name)
        for n in names:
            with pytest.raises(PackageError, match=n):
                render_text(t.read_text(), {k: v for k, v in values.items() if k != n}, name=t.name)


def test_render_tree_copies_non_templates_verbatim(tmp_path):
    src = tmp_path / "src"
    (src / "m" / "1").mkdir(parents=True)
    (src / "m" / "config.pbtxt.tmpl").write_text('name: "@@{name}"\n')
    (src / "m" / "1" / "model.py").write_text("x = '${not_a_placeholder}'\n")
    written = render_tree(src, tmp_path / "out", {"name": "m"})
    assert (tmp_path / "out/m/config.pbtxt").read_text() == 'name: "m"\n'
    assert (tmp_path / "out/m/1/model.py").read_text() == "x = '${not_a_placeholder}'\n"
    assert len(written) == 2
