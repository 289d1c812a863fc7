import warnings

import pytest

from agreement.runs import RunLogger


def test_a_new_run_logs_into_its_folder_without_a_false_warning(tmp_path):
    (tmp_path / "config.yaml").write_text("seed_everything: 0\n")  # written before the logger starts
    logger = RunLogger(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logger.log_metrics({"loss": 1.0}, step=0)
        logger.save()
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",") == ["loss", "step"]
    with pytest.warns(UserWarning, match="metrics.csv exists and will be replaced"):
        RunLogger(tmp_path).log_metrics({"loss": 0.5}, step=0)
