"""Generated spans in hand-written docs (`consensus_gates.bench.reports`)."""

from __future__ import annotations

from consensus_gates.bench.reports import write_sections


def test_only_the_spans_change_and_missing_ones_are_appended(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# Doc\n\nIntro.\n\n<!-- begin a -->\nold a\n<!-- end a -->\n\nOutro.\n")
    # a body with what a regex replacement would mangle: backslashes, group references
    write_sections(doc, {"a": r"new \1 \\ $a", "b": "table b"})
    assert doc.read_text() == (
        "# Doc\n\nIntro.\n\n<!-- begin a -->\nnew \\1 \\\\ $a\n<!-- end a -->\n\nOutro.\n\n"
        "<!-- begin b -->\ntable b\n<!-- end b -->\n"
    )
    write_sections(doc, {"b": "table b, again"})  # idempotent structure: replaced in place
    assert doc.read_text().count("<!-- begin b -->") == 1
    assert "table b, again" in doc.read_text() and "Outro." in doc.read_text()


def test_a_new_doc_gets_the_title_and_the_spans_in_order(tmp_path):
    doc = tmp_path / "new.md"
    write_sections(doc, {"x": "1", "y": ""}, title="Results")
    assert doc.read_text() == (
        "# Results\n\n<!-- begin x -->\n1\n<!-- end x -->\n\n<!-- begin y -->\n<!-- end y -->\n"
    )
