"""The path fields of every widget: magicgui's FileEdit behind the widgets' PathEdit."""

from __future__ import annotations

import pytest


def test_path_edit_is_magicgui_file_edit(qtbot, tmp_path, monkeypatch):
    from magicgui.widgets import FileEdit

    from napari_cpgcn._napari.widgets.common import PathEdit

    w = PathEdit("dir", "a folder")
    qtbot.addWidget(w)
    assert isinstance(w.file_edit, FileEdit) and w.file_edit.mode.value == "d"
    assert w.text() == ""  # empty means "not set", not the current folder
    finished = []
    w.edit.editingFinished.connect(lambda: finished.append(w.text()))
    # the "…" button opens magicgui's dialog; the chosen folder lands in the field and is announced
    monkeypatch.setattr(w.file_edit, "_show_file_dialog", lambda *a, **k: str(tmp_path))
    w.button.click()
    assert w.text() == str(tmp_path) and finished == [str(tmp_path)]
    w.setText("  /some/where  ")
    assert w.text() == "/some/where"
    assert PathEdit("save", filter="CSV (*.csv)").file_edit.mode.value == "w"
    with pytest.raises(ValueError, match="mode must be one of"):
        PathEdit("folder")
