import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.text import Text

from ot_cfm.plotting import save_figure


def test_save_figure_writes_png_into_new_folder_and_closes(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    path = tmp_path / "new" / "folder" / "line.png"
    assert save_figure(fig, str(path), title="a line", dpi=50) == path
    assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 0
    assert "a line" in [t.get_text() for t in fig.findobj(Text)]
    assert not plt.fignum_exists(fig.number)
