import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest
from matplotlib.text import Text

from ot_cfm.evaluation.plotting import IncompleteFigureWarning, figure_problems, save_figure


def test_save_figure_writes_png_into_new_folder_and_closes(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    ax.set(xlabel="a", ylabel="b")
    path = tmp_path / "new" / "folder" / "line.png"
    assert save_figure(fig, str(path), title="a line", dpi=50) == path
    assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 0
    assert "a line" in [t.get_text() for t in fig.findobj(Text)]
    assert not plt.fignum_exists(fig.number)


def test_image_mosaic_places_each_image_in_its_tile():
    import pytest
    import torch

    from ot_cfm.evaluation.plotting import image_mosaic

    images = torch.full((5, 1, 2, 3), -1.0)
    images[3] = 1.0  # second row, first column
    mosaic = image_mosaic(images, 3, pad=1)
    assert mosaic.shape == (2 * 3 + 1, 3 * 4 + 1, 1)
    assert mosaic[4:6, 1:4].eq(1.0).all() and mosaic[1:3, 1:4].eq(0.0).all()  # +1 -> white, -1 -> black
    assert mosaic[4:6, 9:12].eq(1.0).all()  # the empty sixth tile is white
    assert mosaic[0].eq(1.0).all() and mosaic[:, 4].eq(1.0).all()  # padding
    with pytest.raises(ValueError, match="columns"):
        image_mosaic(images, 0)


def test_image_grid_has_title_and_row_labels_inside_the_figure(tmp_path):
    import pytest
    import torch

    from ot_cfm.evaluation.plotting import plot_image_grid

    images = torch.rand(10 * 8, 1, 8, 8) * 2 - 1
    captured = {}
    original = plt.Figure.savefig

    def keep(fig, *args, **kwargs):  # measure the texts as drawn into the file
        done = original(fig, *args, **kwargs)
        renderer = fig.canvas.get_renderer()
        captured["texts"] = [(t.get_text(), t.get_window_extent(renderer)) for t in fig.findobj(Text)
                             if t.get_visible() and t.get_text()]
        captured["box"] = fig.bbox
        return done

    plt.Figure.savefig = keep
    try:
        title = "runs/digits-conditional-exact-coupler, step 2000, Euler NFE 8, guidance 1.0"
        path = plot_image_grid(tmp_path / "grid.png", images, columns=8, row_labels=list(range(10)), title=title)
    finally:
        plt.Figure.savefig = original
    assert path.read_bytes().startswith(b"\x89PNG")
    texts, box = captured["texts"], captured["box"]
    shown = {text for text, _ in texts}
    assert {str(k) for k in range(10)} <= shown
    assert any("step 2000" in t and "NFE 8" in t for t in shown)  # wrapped or not, the title is there
    for text, extent in texts:
        assert box.x0 - 1 <= extent.x0 and extent.x1 <= box.x1 + 1 and box.y0 - 1 <= extent.y0 \
            and extent.y1 <= box.y1 + 1, f"{text!r} is clipped: {extent} outside {box}"
    with pytest.raises(ValueError, match="one per row"):
        plot_image_grid(tmp_path / "bad.png", images, columns=8, row_labels=[0, 1])


def test_figure_problems_names_what_a_reader_would_miss(tmp_path):
    fig, (ax, bx) = plt.subplots(1, 2)
    ax.plot([0, 1], [0, 1], label="one")
    ax.plot([0, 1], [1, 0], label="two")
    bx.imshow([[0.0, 1.0]])  # images alone need no axis labels
    problems = figure_problems(fig)
    assert any("no title" in p for p in problems)
    assert any("no x label" in p for p in problems) and any("no y label" in p for p in problems)
    assert any("2 labelled series but no legend" in p for p in problems)
    assert not any("panel 1" in p and "label" in p for p in problems)
    with pytest.warns(IncompleteFigureWarning, match="no legend"):
        save_figure(fig, tmp_path / "bad.png")

    fig, (ax, bx) = plt.subplots(1, 2, sharey=True)
    for a in (ax, bx):
        a.plot([0, 1], [0, 1], label="one")
        a.plot([0, 1], [1, 0], label="two")
        a.set_xlabel("x")
        a.legend()
    ax.set_ylabel("y")  # shared with bx
    fig.suptitle("complete")
    assert figure_problems(fig) == []
    plt.close(fig)
