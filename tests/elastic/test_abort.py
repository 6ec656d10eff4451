"""The runner's abort carried out on a worker's thread: never in the middle of an update."""

import threading
import time

from scalai.elastic.abort import EXIT_ABORTED, AbortWatch, abort_file


def test_an_abort_waits_for_the_update_in_progress_then_dumps(tmp_path):
    path = abort_file(tmp_path, 3)
    path.parent.mkdir(parents=True)
    state = {"step": 4, "weights": 4}
    dumped = []
    watch = AbortWatch(path, lambda: dumped.append(dict(state)), poll=0.01).start()
    with watch.updating():
        state["weights"] = 5
        path.touch()  # the abort arrives mid-update
        time.sleep(0.2)
        assert watch.fired.is_set() and not dumped  # it waits for the update
        state["step"] = 5
    deadline = time.time() + 10
    while not dumped and time.time() < deadline:
        time.sleep(0.01)
    assert dumped == [{"step": 5, "weights": 5}]  # a whole step, never half of one


def test_a_loop_that_never_locks_is_not_dumped_but_exits(tmp_path):
    path = abort_file(tmp_path, 0)
    path.parent.mkdir(parents=True)
    codes, dumped = [], []
    exited = threading.Event()
    AbortWatch(path, lambda: dumped.append(1), poll=0.01, exit=lambda c: (codes.append(c), exited.set())).start()
    path.touch()
    assert exited.wait(10) and codes == [EXIT_ABORTED] and not dumped


def test_a_stopped_watch_does_nothing(tmp_path):
    path = abort_file(tmp_path, 1)
    path.parent.mkdir(parents=True)
    dumped = []
    watch = AbortWatch(path, lambda: dumped.append(1), poll=0.01).start()
    with watch.updating():
        pass
    watch.stop()
    path.touch()
    time.sleep(0.1)
    assert not dumped
