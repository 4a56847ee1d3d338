"""The driver with the Thompson node, real Ax, no Ray: history replay with every status, the posterior
rebuilt from the history, and bad prior tables from the CLI."""

import json
import math

import pytest

from bo_search.budget import SizeLimit, SlotTable
from bo_search.model import discover_layers, load_structure
from bo_search.search.experiment import AxDriver, Goal, attach_history
from bo_search.search.history import HistoryRow
from bo_search.search.strategies import DriverConfig
from bo_search.search.thompson import Acquisition, Posterior, ThompsonConfig, make_thompson_node
from bo_search.sizes import SizeModel
from bo_search.space import build_space

SPEC = {
    "parameters": [
        {"name": "bitwidth", "name_format": "bitwidth.{i}.", "layers": [{"range": [0, 3], "type": "choice", "values": [2, 3, 4, 8]}]},
        {"name": "groupsize", "name_format": "groupsize.{i}.", "layers": [{"range": [0, 3], "type": "choice", "values": [32, 64]}]},
    ]
}


@pytest.fixture
def setup(tiny_llama):
    model, _ = load_structure(str(tiny_llama))
    layers = discover_layers(model)
    space = build_space(SPEC, layers, "<test>")
    sm = SizeModel(model, layers)
    return space, sm


def _driver(space, sm, limit):
    problem = SlotTable.build(space, sm)
    acq = Acquisition("budget", float(SizeLimit(limit).bits - problem.base_bits))
    node = make_thompson_node(space, "relaxed", problem, acq, "nll", ThompsonConfig(seed=0))
    goal = Goal(objective="nll", minimize=True, constraint_metric="model_size_gb", limit=limit, search="modelsize")
    return AxDriver(space, goal, DriverConfig(strategy="thompson", seed=0), node), problem


def _history(space, sm):
    plans = [space.uniform(b, g) for b in (3, 4, 8) for g in (32, 64)]
    rows = []
    for i, vals in enumerate(plans):
        plan = space.decode(vals)
        size = sm.gb(plan)
        status = ["completed", "completed", "failed", "completed", "abandoned", "infeasible"][i]
        nll = 2.0 + 0.3 * i if status == "completed" else None
        rows.append(
            HistoryRow(trial_index=i, status=status, source="seed", reason="boom" if status == "failed" else "", nll=nll,
                       cal_PPL=math.exp(nll) if nll else None, model_size=size, quant_config=plan.dumps())
        )  # fmt: skip
    return rows


def test_resume_replays_every_status_and_rebuilds_the_same_posterior(setup):
    from ax.core.trial_status import TrialStatus

    space, sm = setup
    rows = _history(space, sm)
    limit = max(r.model_size for r in rows) * 1.01
    posts = []
    for _ in range(2):  # two resumes of the same history
        driver, problem = _driver(space, sm, limit)
        attach_history(driver, rows)
        trials = driver.client._experiment.trials
        want = {"completed": TrialStatus.COMPLETED, "failed": TrialStatus.FAILED, "abandoned": TrialStatus.ABANDONED,
                "infeasible": TrialStatus.COMPLETED}  # fmt: skip
        assert [trials[i].status for i in range(len(rows))] == [want[r.status] for r in rows]
        assert trials[2].status_reason == "boom"
        got = driver.propose()
        assert got is not None and got[2] == "thompson"
        assert space.decode(got[1]) not in {r.plan for r in rows}  # no evaluated, failed or abandoned plan again
        posts.append(driver.node.posterior)
    a, b = posts
    assert a.n == b.n == 3  # completed rows only (the infeasible one has no objective)
    assert a.theta_mean.tolist() == b.theta_mean.tolist() and (a.noise, a.scale) == (b.noise, b.scale)
    # and it is the posterior of the CSV's completed rows, fitted directly
    done = [r for r in rows if r.status == "completed"]
    direct = Posterior(problem, ThompsonConfig()).fit([problem.pick_of(space.encode(r.plan)) for r in done], [r.nll for r in done])
    assert direct.theta_mean.tolist() == pytest.approx(a.theta_mean.tolist(), rel=1e-9, abs=1e-12)


@pytest.mark.slow
def test_prior_from_another_model_or_space_is_one_line_exit_2(tiny_llama, tiny_ctx, tmp_path):
    from clitools import base_args, run_main, tiny_space

    from bo_search.sensitivity.compute import compute
    from bo_search.sensitivity.table import SensitivityConfig

    space_path = tiny_space(tmp_path / "space.json")
    from bo_search.space import load_space

    sens = compute(tiny_ctx, load_space(space_path, tiny_ctx.layers), SensitivityConfig("fit", nsamples=2, seq_len=32)).to_json()
    other_model = dict(sens, model_id="0123456789ab")
    (tmp_path / "other_model.json").write_text(json.dumps(other_model))
    missing = json.loads(json.dumps(sens))
    for row in missing["costs"].values():
        row.pop("2:32", None)
    (tmp_path / "other_space.json").write_text(json.dumps(missing))
    for name, needle in (("other_model.json", "computed for model"), ("other_space.json", "has no cost for 2:32")):
        code, _, err = run_main(
            "bo_search.acc_modelsize", base_args(tiny_llama, space_path, tmp_path / f"{name}.csv", "--prior", str(tmp_path / name))
        )  # in this process: test_runner runs one refusal as a subprocess
        assert code == 2 and needle in err and err.strip().count("\n") == 0, err[-2000:]
        assert not (tmp_path / f"{name}.csv").exists()
