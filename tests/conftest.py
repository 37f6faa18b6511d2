"""One local Spark session with real Delta Lake for the whole test run, and a temp warehouse per test."""
import logging
import os
import sys

import pytest

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one); "
                                       "bash benchmarks/gpu_check.sh runs them on a GPU machine")


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    from bertxml.config import Config
    from bertxml.platform.warehouse import get_spark

    cfg = Config()
    cfg.spark.master = "local[2]"
    cfg.spark.shuffle_partitions = 2
    cfg.spark.driver_memory = "3g"
    session = get_spark(cfg, app="bertxml-tests")
    yield session
    session.stop()


@pytest.fixture
def cfg():
    from bertxml.config import Config

    c = Config()
    c.spark.shuffle_partitions = 2
    c.mlflow.log_runs = False  # the MLflow store's first use costs seconds; tests/test_registry.py covers it
    return c


@pytest.fixture
def wh(spark, tmp_path, cfg):
    """A fresh, empty warehouse in a temp folder."""
    from bertxml.platform.warehouse import Warehouse

    for db in ("ehr", cfg.warehouse.schema):
        spark.sql(f"DROP DATABASE IF EXISTS `{db}` CASCADE")
    return Warehouse(spark, tmp_path / "warehouse", cfg)


@pytest.fixture(autouse=True)
def _bertxml_logs(caplog):
    caplog.set_level(logging.INFO, logger="bertxml")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny tensors gain nothing from threads, and on a shared 2-core machine they lose a lot to contention."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
