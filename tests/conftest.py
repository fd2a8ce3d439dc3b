import shutil
from pathlib import Path

import pytest
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture(autouse=True)
def flower_task_identity():
    """Flower's runtime sets this in every app process; Messages built in tests need one too."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield


@pytest.fixture
def app(tmp_path):
    """A copy of the app without .venv, results/ or caches: what `flwr run` would package."""
    skip = shutil.ignore_patterns(".venv", ".git", "results", "__pycache__", ".flwr", ".*cache", "wheels")
    shutil.copytree(Path(__file__).resolve().parents[1], tmp_path / "app", ignore=skip)
    return tmp_path / "app"
