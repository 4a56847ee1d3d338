import copy
import json

import pytest
from layers import llama3_8b, smollm2

from bo_search.space import build_space, default_space_spec, load_initial_samples, load_space, write_initial_samples
from bo_search.types import LayerQuant, QuantPlan, UserError

SEED = {
    "parameters": [
        {
            "name": "bitwidth",
            "name_format": "bitwidth.{i}.",
            "layers": [{"range": [0, 3], "type": "fixed", "value": 5}, {"range": [3, 30], "type": "choice", "values": [2, 3, 4, 5, 6, 8]}],
        },
        {"name": "groupsize", "name_format": "groupsize.{i}.", "layers": [{"range": [0, 30], "type": "choice", "values": [32, 64, 192]}]},
    ]
}


def test_seed_format_accepted_as_is():
    space = build_space(SEED, smollm2())
    assert len(space.slots) == 30
    assert len(space.tunable) == 27 + 30
    assert space.params["bitwidth.0."].fixed and space.params["bitwidth.0."].values == (5,)
    assert space.params["bitwidth.3."].values == (2, 3, 4, 5, 6, 8)


def test_shipped_spaces_load():
    assert len(load_space("parameter_spaces/smollm2_135m_per_block.json", smollm2()).tunable) == 60
    assert len(load_space("parameter_spaces/smollm2_135m_per_linear.json", smollm2()).tunable) == 420
    assert len(load_space("parameter_spaces/smollm2_135m_fused_groups.json", smollm2()).tunable) == 240
    llama = load_space("parameter_spaces/llama3_8b_per_block.json", llama3_8b())
    assert len(llama.tunable) == 27 * 2
    plan = llama.decode(llama.cheapest())
    assert plan["model.layers.0.mlp.up_proj"] == LayerQuant(5, 32)
    assert plan["model.layers.31.self_attn.q_proj"] == LayerQuant(5, 32)
    assert plan["model.layers.3.self_attn.q_proj"] == LayerQuant(2, 256)


def test_round_trip_plan_params():
    space = build_space(SEED, smollm2())
    params = {p.name: p.values[(i * 7) % len(p.values)] for i, p in enumerate(space.tunable)}
    plan = space.decode(params)
    assert len(plan) == 210
    assert space.encode(plan) == params
    # every linear of block 7 shares the block's setting
    assert {plan[f"model.layers.7.{n}"] for n in ("self_attn.q_proj", "mlp.down_proj")} == {
        LayerQuant(params["bitwidth.7."], params["groupsize.7."])
    }
    assert QuantPlan.loads(plan.dumps()) == plan


def test_per_linear_and_groups_round_trip():
    space = load_space("parameter_spaces/smollm2_135m_fused_groups.json", smollm2())
    names = {p.name for p in space.tunable}
    assert "bitwidth.4.qkv" in names and "groupsize.29.down" in names
    params = {p.name: p.values[-1 if p.block % 2 else 0] for p in space.tunable}
    plan = space.decode(params)
    assert plan["model.layers.1.self_attn.q_proj"] == plan["model.layers.1.self_attn.v_proj"]
    assert space.encode(plan) == params


def test_groups_restricted_entries():
    spec = copy.deepcopy(SEED)
    spec["granularity"] = [{"name": "attn", "regex": r"self_attn\..*"}, {"name": "mlp", "regex": r"mlp\..*"}]
    spec["parameters"][0]["name_format"] = "bitwidth.{i}.{group}"
    spec["parameters"][1]["name_format"] = "groupsize.{i}.{group}"
    spec["parameters"][0]["layers"] = [
        {"range": [0, 30], "type": "fixed", "value": 8, "groups": ["attn"]},
        {"range": [0, 30], "type": "choice", "values": [3, 4], "groups": ["mlp"]},
    ]
    space = build_space(spec, smollm2())
    assert space.params["bitwidth.0.attn"].fixed
    assert space.params["bitwidth.0.mlp"].values == (3, 4)


def test_symmetric_and_16_bits_and_per_channel():
    spec = copy.deepcopy(SEED)
    spec["symmetric"] = True
    spec["parameters"][0]["layers"][1]["values"] = [4, 16]
    spec["parameters"][1]["layers"][0]["values"] = [64, -1]
    space = build_space(spec, smollm2())
    plan = space.decode({**{f"bitwidth.{i}.": 16 for i in range(3, 30)}, **{f"groupsize.{i}.": -1 for i in range(30)}})
    assert not plan["model.layers.5.mlp.up_proj"].is_quantized
    assert plan["model.layers.0.mlp.up_proj"] == LayerQuant(5, -1, symmetric=True)


def _with(mutate):
    spec = copy.deepcopy(SEED)
    mutate(spec)
    return spec


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: s["parameters"][0]["layers"][1].__setitem__("range", [3, 31]), "goes past the model's 30 blocks"),
        (lambda s: s["parameters"][0]["layers"][1].__setitem__("range", [2, 30]), "ranges overlap"),
        (lambda s: s["parameters"][0]["layers"][1].__setitem__("range", [4, 30]), "does not cover block 3"),
        (lambda s: s["parameters"][0]["layers"][1].__setitem__("values", []), 'non-empty "values"'),
        (lambda s: s["parameters"][0]["layers"][1].__setitem__("values", [4, 9]), "bitwidth 9 is not allowed"),
        (lambda s: s["parameters"][0]["layers"][1].__setitem__("values", [0, 4]), "bitwidth 0 is not allowed"),
        (
            lambda s: s["parameters"][1]["layers"][0].__setitem__("values", [64, 128]),
            "groupsize 128 (groupsize.0.) does not divide in_features=576",
        ),
        (
            lambda s: s.__setitem__("granularity", [{"name": "x", "regex": "nothing_here"}, {"name": "all", "regex": ".*"}]),
            "regex 'x' matches no layer",
        ),
        (lambda s: s.__setitem__("granularity", [{"name": "attn", "regex": "self_attn.*"}]), "matches no granularity group"),
        (lambda s: s["parameters"][0].__setitem__("name", "bitz"), 'use "bitwidth" or "groupsize"'),
        (lambda s: s["parameters"][0]["layers"][0].__setitem__("type", "range"), 'type must be "fixed" or "choice"'),
        (lambda s: s["parameters"].pop(), "needs both"),
    ],
)
def test_validation_errors(mutate, message):
    with pytest.raises(UserError, match=None) as info:
        build_space(_with(mutate), smollm2())
    assert message in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


def test_malformed_json(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{"parameters": [}')
    with pytest.raises(UserError, match="is not valid JSON"):
        load_space(p, smollm2())
    with pytest.raises(UserError, match="not found"):
        load_space(tmp_path / "missing.json", smollm2())


def test_initial_samples_validation(tmp_path):
    space = build_space(SEED, smollm2())
    good = {**{f"bitwidth.{i}.": 4 for i in range(30)}, **{f"groupsize.{i}.": 64 for i in range(30)}}
    good.update({"bitwidth.0.": 5, "bitwidth.1.": 5, "bitwidth.2.": 5})
    p = tmp_path / "s.json"
    p.write_text(json.dumps({"initial_samples": [good]}))
    [s] = load_initial_samples(p, space)
    assert "bitwidth.0." not in s and s["bitwidth.3."] == 4
    for bad, msg in [
        ({**good, "bitwidth.99.": 4}, "'bitwidth.99.' is not a parameter"),
        ({**good, "bitwidth.4.": 7}, "'bitwidth.4.' = 7 is not allowed"),
        ({**good, "bitwidth.0.": 4}, "'bitwidth.0.' = 4 is not allowed"),
        ({k: v for k, v in good.items() if k != "groupsize.9."}, "missing 'groupsize.9.'"),
    ]:
        p.write_text(json.dumps({"initial_samples": [bad]}))
        with pytest.raises(UserError) as info:
            load_initial_samples(p, space)
        assert msg in str(info.value) and "sample 0" in str(info.value)


def test_shipped_initial_samples_and_write_round_trip(tmp_path):
    space = load_space("parameter_spaces/smollm2_135m_per_block.json", smollm2())
    samples = load_initial_samples("initial_samples/smollm2_135m_per_block.json", space)
    assert len(samples) >= 3
    out = tmp_path / "o.json"
    write_initial_samples(out, samples, space)
    assert load_initial_samples(out, space) == samples


def test_default_space_has_dividing_groups():
    spec = default_space_spec(smollm2())
    assert spec["parameters"][1]["layers"][0]["values"] == [32, 64, 192]
    build_space(spec, smollm2())


@pytest.mark.parametrize("encoding", ["relaxed", "choice", "float"])
def test_ax_encoding_round_trip(encoding):
    from bo_search.space import ax_parameters, from_ax, to_ax

    space = build_space(SEED, smollm2())
    params = {p.name: p.values[(3 * i) % len(p.values)] for i, p in enumerate(space.tunable)}
    ax = to_ax(space, params, encoding)
    assert from_ax(space, ax, encoding) == params
    kinds = {a.kind for a in ax_parameters(space, encoding)}
    assert kinds == ({"float"} if encoding == "float" else {"choice"})
    if encoding == "float":
        assert all(0 < v < 1 for v in ax.values())
        # every float in a value's bin decodes to that value
        p = space.tunable[0]
        assert [from_ax(space, {**ax, p.name: x}, "float")[p.name] for x in (0.0, 1.01 / len(p.values), 0.99, 1.0)] == [
            p.values[0],
            p.values[1],
            p.values[-1],
            p.values[-1],
        ]
