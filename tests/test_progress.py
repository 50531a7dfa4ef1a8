"""Progress on stderr (lidr_jax.progress): a bar on a terminal; in a log, a line at most every `every`
seconds and exactly one final line, whatever the number of updates."""

import io

from tqdm.auto import tqdm

from lidr_jax.progress import LogProgress, progress


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_log_progress_writes_a_line_per_interval_and_one_final_line():
    out, clock = io.StringIO(), Clock()
    bar = LogProgress(4, "DPO", "step", every=30.0, file=out, clock=clock)
    bar.set_postfix(loss="0.6931")
    bar.update(1)  # 0 s since the start: nothing
    clock.t += 31
    bar.update(1)  # 31 s: a line
    clock.t += 10
    bar.update(1)  # 10 s after it: nothing
    clock.t += 40
    bar.update(1)  # the last step: left to close, so the final state is written once
    bar.close()
    bar.close()  # closing twice writes nothing more
    assert out.getvalue().splitlines() == [
        "DPO: 2/4 step [00:31, 0.0645 step/s, loss=0.6931]",
        "DPO: 4/4 step [01:21, 0.0494 step/s, loss=0.6931]",
    ]


def test_a_resumed_loop_counts_its_rate_from_where_it_started():
    out, clock = io.StringIO(), Clock()
    with LogProgress(10, "DPO", "step", initial=8, file=out, clock=clock) as bar:
        clock.t += 4
        bar.update(2)
    assert out.getvalue() == "DPO: 10/10 step [00:04, 0.5 step/s]\n"


def test_a_log_gets_lines_a_terminal_a_bar_and_disabled_progress_nothing():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    log = io.StringIO()
    bar = progress(3, "generate", "seq", file=log)
    assert isinstance(bar, LogProgress)
    bar.update(3)
    bar.close()
    assert log.getvalue().startswith("generate: 3/3 seq [00:00") and log.getvalue().count("\n") == 1
    terminal = progress(3, "generate", "seq", file=Terminal())
    assert isinstance(terminal, tqdm)
    terminal.close()
    quiet = io.StringIO()
    bar = progress(3, "generate", "seq", enabled=False, file=quiet)
    bar.update(3)
    bar.close()
    assert quiet.getvalue() == ""
