import logging

import pytest

from p2ch.progress import Progress

LOGGER = "p2ch.test_progress"


def progress_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER]


@pytest.mark.parametrize("total", [3, None])
def test_the_final_line_is_logged_once_when_the_interval_elapses_at_the_last_item(caplog, total):
    caplog.set_level(logging.INFO, logger=LOGGER)
    with Progress(total, "work", bar=False, interval=0.0, logger=logging.getLogger(LOGGER)) as progress:
        for _ in range(3):
            progress.update()
    # One line per update (interval 0), and close() adds none: the last one was the final line.
    assert len(progress_records(caplog)) == 3
    assert progress.count == 3


def test_close_logs_the_final_line_when_update_did_not(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    progress = Progress(3, "work", bar=False, interval=0.0, logger=logging.getLogger(LOGGER))
    progress.update(2)
    progress.interval = 3600.0  # the last update falls inside the interval: nothing logged
    progress.update()
    assert len(progress_records(caplog)) == 1
    progress.close()
    assert len(progress_records(caplog)) == 2
    progress.close()  # closing twice logs nothing more
    assert len(progress_records(caplog)) == 2


def test_disabled_or_empty_progress_logs_nothing(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    with Progress(3, "work", bar=False, interval=0.0, enabled=False, logger=logging.getLogger(LOGGER)) as progress:
        progress.update(3)
    with Progress(3, "work", bar=False, interval=0.0, logger=logging.getLogger(LOGGER)):
        pass
    assert progress.count == 3
    assert progress_records(caplog) == []
