"""The checkpoint every training loop shares: named states, step and extra state, one file."""

from __future__ import annotations

import json

import torch

from cfexplain.stages._shared import Checkpoint
from cfexplain.utils.distributed import Dist
from cfexplain.utils.tracking import Run


def _net(seed: int) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 2)


def test_states_step_and_extra_come_back_and_the_log_is_rewound(tmp_path):
    run, d = Run("stage", tmp_path / "stage"), Dist(device=torch.device("cpu"))
    net = _net(0)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    fresh = Checkpoint(run, d, rng=True, model=net, opt=opt)
    assert fresh.load() is None and fresh.step is None  # nothing to resume: start from scratch
    for step in (10, 20, 30):
        run.log({"loss": 1.0 / step}, step=step)
    fresh.save(20, loop={"step": 20, "seen": [1, 2]})
    after = torch.rand(4)  # the global RNG right after the checkpoint

    net2 = _net(1)
    opt2 = torch.optim.Adam(net2.parameters(), lr=0.1)
    ckpt = Checkpoint(run, d, rng=True, model=net2, opt=opt2)
    assert ckpt.load() == {"loop": {"step": 20, "seen": [1, 2]}} and ckpt.step == 20
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), net2.parameters()))
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert torch.equal(torch.rand(4), after)
    rows = [json.loads(x) for x in (run.dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20]  # step 30 comes again after the resume


def test_states_added_later_are_restored_when_the_file_has_them(tmp_path):
    run, d = Run("stage", tmp_path / "stage"), Dist(device=torch.device("cpu"))
    first = Checkpoint(run, d)
    first.load()
    a = _net(0)
    first.add(a=a)
    first.save(5, models={"a": {"finished": True}})

    again = Checkpoint(run, d)
    assert again.load() == {"models": {"a": {"finished": True}}}
    a2, b2 = _net(1), _net(2)
    b_before = [p.clone() for p in b2.parameters()]
    again.add(a=a2)  # in the file: restored
    again.add(b=b2)  # not yet: left as built
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), a2.parameters()))
    assert all(torch.equal(x, y) for x, y in zip(b_before, b2.parameters()))
    again.save(6)
    assert torch.load(run.dir / "state.pt", weights_only=True)["states"] == ["a", "b"]
