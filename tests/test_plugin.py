"""The plug-in example of docs/plugin.md, run exactly as written: an existing Flower app adopting the
PMAFL strategy and `train_model`, driven through an in-process grid."""

import re
import sys
from pathlib import Path

import torch
from inprocess import InProcessGrid

from pmafl.models import create_model
from pmafl.teacher import save_teacher

PAGE = Path(__file__).resolve().parents[1] / "docs" / "plugin.md"


def page_example() -> str:
    text = PAGE.read_text()
    match = re.search(r"<!-- plugin-example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "docs/plugin.md lost its plug-in example"
    return match.group(1)


def test_plugin_example_runs(tmp_path, monkeypatch):
    (tmp_path / "my_app.py").write_text(page_example())
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_app", None)
    import my_app

    teacher_file = tmp_path / "teacher.pt"
    torch.manual_seed(0)
    save_teacher(create_model("cnn-small", 10, 1, [0.3], [0.4]), teacher_file,
                 {"model": "cnn-small", "num_classes": 10, "in_channels": 1, "mean": [0.3], "std": [0.4]})
    node_configs = {node: {"partition-id": i, "num-partitions": 2, "teacher-file": str(teacher_file)}
                    for i, node in enumerate((21, 22))}
    model_path = tmp_path / "global.pt"
    run_config = {"num-server-rounds": 1, "model-path": str(model_path)}
    grid = InProcessGrid({"train": my_app.train}, node_configs, run_config)
    my_app.main(grid, grid.contexts[21])

    replies = grid.replies[0]  # the train exchange; the (empty) evaluate exchange follows
    assert not any(r.has_error() for r in replies)
    # The saved global model is the example-weighted mean of the two clients' models, no weight
    # above the median claim (PMAFL's default weight cap).
    claims = [r.content["metrics"]["num-examples"] for r in replies]
    assert sorted(claims) == [898, 899]  # load_digits' 1797 images split two ways
    weights = [min(claim, 898.5) for claim in claims]
    states = [r.content["arrays"].to_torch_state_dict() for r in replies]
    saved = torch.load(model_path)
    for key in saved:
        manual = sum(w * s[key] for w, s in zip(weights, states)) / sum(weights)
        assert torch.allclose(saved[key], manual, atol=1e-6)
