import pytest

from hack.localstack import Processes


@pytest.fixture
def procs(tmp_path):
    p = Processes(tmp_path)
    yield p
    p.stop_all()


@pytest.fixture(scope="module")
def module_procs(tmp_path_factory):
    p = Processes(tmp_path_factory.mktemp("procs"))
    yield p
    p.stop_all()
