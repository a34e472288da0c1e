"""Session fixtures of the export tests (helpers live in export_fixtures.py)."""

import pytest
from export_fixtures import make_workdir


@pytest.fixture(scope="session")
def fake_workdir(tmp_path_factory):
    return make_workdir(str(tmp_path_factory.mktemp("export") / "workdir"))
