"""Parts of the runner without processes: lead steps, the persistent copy's hold, PTCs
reused across layouts that keep their parallel axes."""

import threading
import time

from scalai.elastic.ahead import lead_steps


def test_lead_steps_cover_the_start_up():
    assert lead_steps([], []) == 21  # 10 s over 0.5 s, plus one
    assert lead_steps([4.0, 6.0, 30.0], [0.0, 1.0, 2.0, 3.0]) == 7


def test_persister_holds_copies_during_a_reconfiguration(tmp_path):
    from scalai.elastic.persist import Persister

    tried = threading.Event()
    errors: list[str] = []

    def urls():
        tried.set()
        return ["http://127.0.0.1:9"]  # nothing listens: the copy fails, and says so

    p = Persister(urls, "job", tmp_path / "ckpts", on_error=errors.append)
    try:
        p.hold()
        p.submit("v3", 30)
        time.sleep(0.3)
        assert not tried.is_set() and p.in_use() == {"v3"}  # waiting, kept in the stores
        p.hold(False)
        assert tried.wait(10) and p.wait_idle(30)
        assert errors and "v3 (step 30)" in errors[0] and p.latest() is None
    finally:
        p.close()


def test_known_ptc_reuses_a_layout_with_the_same_axes():
    """A PTC reported under tp=2,dp=2 serves tp=4,dp=2 (relaid out: the same axes in use),
    not layouts that drop or add an axis (they wait for their own announcement)."""
    from scalai.config import ParallelConfig
    from scalai.elastic.jobstate import axes_in_use, known_ptc
    from scalai.layout.dtensor import AxisPlacement, MeshSplit
    from scalai.layout.ptc import PTC
    from scalai.layout.spec import Residence, TensorSpec

    split = MeshSplit((AxisPlacement.replicate("dp"), AxisPlacement.shard("tp", 0)))
    spec = TensorSpec("w", (8, 4), "float32", split, Residence.from_json("first"))
    seen = (PTC(ParallelConfig.parse("tp=2,pp=1,dp=2"), [spec], 2),)

    def known(text):
        return known_ptc(seen, ParallelConfig.parse(text))

    assert axes_in_use(ParallelConfig.parse("tp=4,pp=2,dp=2")) == (True, True, False)
    got = known("tp=4,pp=2,dp=2")
    assert got is not None and str(got.config) == "tp=4,pp=2,dp=2"
    assert got.rank_shards(0)[0][1].shape == (2, 4)  # the tp split survives the relayout
    assert known("tp=4,pp=1,dp=1") is None and known("tp=1,pp=1,dp=2") is None
    assert known("tp=2,pp=1,dp=2,zero=1") is None  # FSDP sharding is another axis in use
