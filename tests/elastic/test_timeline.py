"""Timeline records and plots."""

from scalai.elastic.timeline import Reconfiguration, plot_loss, plot_timeline, read_timeline, write_timeline


def _changes():
    return [Reconfiguration(10, "tp=2,pp=1,dp=1", "tp=1,pp=1,dp=4", "grow to 4 devices",
                            {"stop": 0.1, "save": 0.5, "plan": 0.01, "transform": 0.8, "relaunch": 2.0,
                             "load": 0.3, "first_step": 0.2}, bytes_moved=5 << 20),
            Reconfiguration(20, "tp=1,pp=1,dp=4", "tp=1,pp=1,dp=3", "worker 1 failed",
                            {"stop": 0.0, "plan": 0.01, "transform": 0.4, "relaunch": 2.0},
                            steps_lost=0, recovered_from="replicas")]


def test_timeline_round_trip(tmp_path):
    path = tmp_path / "timeline.json"
    write_timeline(path, _changes())
    again = read_timeline(path)
    assert again == _changes()
    assert abs(again[0].downtime - 3.91) < 1e-9


def test_plots_are_png_files(tmp_path):
    plot_timeline(_changes(), tmp_path / "t.png")
    rows = [{"step": s, "loss": 5.0 / (s + 1)} for s in range(30)]
    plot_loss({"elastic": rows, "unchanged": rows}, tmp_path / "l.png", _changes())
    for name in ("t.png", "l.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_figures_are_saved_atomically_from_several_threads_and_a_failed_draw_leaves_the_old_png(tmp_path):
    import os
    import threading

    import pytest
    from matplotlib.figure import Figure  # not pyplot's registry, which threads must not share

    from scalai.training.plot import save_figure

    path = tmp_path / "t.png"
    errors = []

    def draw(i):
        try:
            for _ in range(3):
                fig = Figure()
                fig.add_subplot().plot([0, i])
                save_figure(fig, path, dpi=40)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=draw, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    good = path.read_bytes()
    assert good[:8] == b"\x89PNG\r\n\x1a\n"

    def half_then_full(tmp, **_):  # a draw that dies half way through its file
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    fig = Figure()
    fig.add_subplot().plot([0, 1])
    fig.savefig = half_then_full
    with pytest.raises(OSError, match="disk full"):
        save_figure(fig, path, dpi=40)
    assert path.read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["t.png"]
