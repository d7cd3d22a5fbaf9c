"""The loss plot (issue 14, item 15): matplotlib, labelled axes, a train/validation legend, a log-scale option,
the learning rate on a second axis; without matplotlib, a hint instead of a picture."""

from __future__ import annotations

import json
import sys

import pytest

from neoxja.train import metrics as M

RECORDS = [{"step": s, "loss": 10 / s, "lr": 1e-3 * min(1, s / 5)} | ({"val_loss": 11 / s} if s % 5 == 0 else {})
           for s in range(1, 21)]


@pytest.fixture
def metrics_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS) + '{"step": 21, "lo')  # torn last line
    return path


def test_figure_has_labels_legend_and_learning_rate_axis():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    for log_y in (False, True):
        fig = M.loss_figure(RECORDS, log_y=log_y)
        ax, lr_ax = fig.axes
        assert ax.get_xlabel() == "step" and "loss" in ax.get_ylabel()
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["training loss", "validation loss",
                                                                        "learning rate"]
        assert lr_ax.get_ylabel() == "learning rate"
        assert list(lr_ax.lines[0].get_ydata()) == [r["lr"] for r in RECORDS]
        assert list(ax.lines[1].get_xdata()) == [5, 10, 15, 20]  # validation at its own steps
        assert ax.get_yscale() == ("log" if log_y else "linear")
        plt.close(fig)


def test_png_is_written_and_can_be_redrawn_on_a_log_scale(metrics_file, tmp_path):
    pytest.importorskip("matplotlib")
    png = M.plot_loss_curve(metrics_file, tmp_path / "loss.png")
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert M.main([str(metrics_file), str(tmp_path / "log.png"), "--log-y"]) == 0
    assert (tmp_path / "log.png").read_bytes().startswith(b"\x89PNG")
    assert not list(tmp_path.glob("*.tmp*"))


def test_without_matplotlib_it_says_how_to_get_the_plot(metrics_file, tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as when it is not installed
    assert M.plot_loss_curve(metrics_file, tmp_path / "loss.png") is None
    assert not (tmp_path / "loss.png").exists()
    err = capsys.readouterr().err
    assert "pip install 'neoxja[train]'" in err and "python -m neoxja.train.metrics" in err


def test_the_hand_made_png_writer_is_gone():
    assert not hasattr(M, "_write_png") and not hasattr(M, "GLYPHS")
