"""The recipe study (benchmarks/recipe_study.py): its --quick path end to end, the cache, the skip of a
configuration whose capability is missing, and the Pareto front."""

import json

import pytest

from benchmarks import recipe_study
from cpt_plugin.integrations.hf import uninstall_trainer_hooks


@pytest.fixture(autouse=True)
def _restore_trainer():
    yield
    uninstall_trainer_hooks()


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    """One --quick study of two configurations at one seed (base built once for the module's tests)."""
    out = tmp_path_factory.mktemp("recipe")
    assert (
        recipe_study.main(["--out", str(out), "--quick", "--seeds", "1", "--only", "baseline", "emb-lr-1.0"])
        == 0
    )
    uninstall_trainer_hooks()
    return out


def test_quick_study_writes_results_table_and_plots(quick_study):
    results = json.loads((quick_study / "results.json").read_text())
    assert list(results["configs"]) == ["baseline", "emb-lr-1.0"]
    for config in results["configs"].values():
        assert list(config["seeds"]) == ["0"]
        assert config["new"]["spread"] == 0.0  # one seed
        assert config["forgetting"]["mean"] == pytest.approx(
            config["old"]["mean"] - results["base"]["loss"]["old"]
        )
    assert results["configs"]["emb-lr-1.0"]["cpt"]["embedding_lr_ratio"] == 1.0
    paired = results["configs"]["emb-lr-1.0"]["vs_baseline"]
    one, base = results["configs"]["emb-lr-1.0"], results["configs"]["baseline"]
    assert paired["new"]["mean"] == pytest.approx(one["new"]["mean"] - base["new"]["mean"])
    assert set(results["pareto_front"]) <= {"baseline", "emb-lr-1.0"} and results["pareto_front"]
    assert (quick_study / "runs" / "baseline-seed0.json").is_file()
    for png in ("pareto.png", "axes.png"):
        assert (quick_study / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (quick_study / "results.md").read_text()
    assert "| base (before CPT) |" in table and "emb LR x1.0" in table and " ± " in table


def test_rerun_resumes_from_the_cache(quick_study, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("a cached run was trained again")

    monkeypatch.setattr(recipe_study, "train_run", no_training)
    assert (
        recipe_study.main(["--out", str(quick_study), "--quick", "--seeds", "1", "--only", "baseline"]) == 0
    )
    assert list(json.loads((quick_study / "results.json").read_text())["configs"]) == ["baseline"]


def test_a_run_made_with_other_shared_settings_is_trained_again(quick_study, monkeypatch):
    path = quick_study / "runs" / "baseline-seed0.json"
    result = json.loads(path.read_text())
    result["config"]["min_lr_ratio"] = 0.5  # as if the shared CPT keys had changed since
    path.write_text(json.dumps(result))
    trained = []
    real = recipe_study.train_run
    monkeypatch.setattr(recipe_study, "train_run", lambda *a: trained.append(a[1].name) or real(*a))
    assert (
        recipe_study.main(["--out", str(quick_study), "--quick", "--seeds", "1", "--only", "baseline"]) == 0
    )
    assert trained == ["baseline"]
    assert json.loads(path.read_text())["config"]["min_lr_ratio"] == 0.1


def test_missing_capability_skips_the_configuration_never_fakes_it(quick_study, monkeypatch, caplog):
    monkeypatch.setitem(recipe_study.CAPABILITIES, "row_aware", lambda: "row-aware LR not built yet")
    caplog.set_level("INFO", logger="benchmarks.recipe_study")
    args = ["--out", str(quick_study), "--quick", "--seeds", "1", "--only", "baseline", "row-aware"]
    assert recipe_study.main(args) == 0
    results = json.loads((quick_study / "results.json").read_text())
    assert results["configs"]["row-aware"]["skipped"] == "row-aware LR not built yet"
    assert "new" not in results["configs"]["row-aware"]
    assert not (quick_study / "runs" / "row-aware-seed0.json").exists()
    assert "row-aware: skipped, row-aware LR not built yet" in caplog.text
    assert "skipped: row-aware LR not built yet" in (quick_study / "results.md").read_text()


def test_other_settings_in_the_cache_are_refused(quick_study):
    with pytest.raises(SystemExit, match="other settings"):
        recipe_study.prepare_study(quick_study, recipe_study.FULL)


def test_unknown_configuration_names_the_closest():
    with pytest.raises(SystemExit, match="Did you mean 'baseline'"):
        recipe_study.select(["basline"])


def test_pareto_front_on_hand_made_points():
    points = {
        "a": (1.0, 0.5),  # best new-domain loss
        "b": (2.0, 0.1),  # least forgetting
        "c": (1.5, 0.3),  # between: on the front
        "d": (2.0, 0.6),  # dominated by a, b and c
        "e": (1.0, 0.7),  # same x as a, worse y: dominated
        "f": (1.5, 0.3),  # equal to c: neither dominates the other
    }
    assert recipe_study.pareto_front(points) == ["a", "c", "f", "b"]
    assert recipe_study.pareto_front({"only": (3.0, 3.0)}) == ["only"]


def test_paired_difference_cancels_what_both_seeds_share():
    """Seed 1 is worse for both configurations (a harder data order): the paired difference sees only the
    configuration's own effect, with no spread."""
    config = {"seeds": {"0": {"new": 5.0, "forgetting": 0.30}, "1": {"new": 5.5, "forgetting": 0.40}}}
    reference = {
        "seeds": {"0": {"new": 5.2, "forgetting": 0.20}, "1": {"new": 5.7, "forgetting": 0.30}, "2": {}}
    }
    paired = recipe_study.paired_difference(config, reference)
    assert paired["seeds"] == 2
    assert paired["new"]["mean"] == pytest.approx(-0.2) and paired["new"]["spread"] == pytest.approx(0.0)
    assert paired["forgetting"]["mean"] == pytest.approx(0.1) and paired["forgetting"][
        "spread"
    ] == pytest.approx(0.0)


def test_grid_has_each_axis_and_one_shared_baseline():
    names = [spec.name for spec in recipe_study.GRID]
    assert len(names) == len(set(names))
    configs = [tuple(sorted(spec.cpt.items())) for spec in recipe_study.GRID]
    assert len(configs) == len(set(configs))  # no configuration is run twice under two names
    for axis, order in recipe_study.AXIS_ORDER.items():
        assert "baseline" in order and all(axis in recipe_study.select([n])[0].axes for n in order)


def test_probes_run_by_name_only_and_repeat_no_grid_configuration():
    grid = {tuple(sorted(spec.cpt.items())) for spec in recipe_study.GRID}
    assert all(tuple(sorted(p.cpt.items())) not in grid for p in recipe_study.PROBES)
    assert [s.name for s in recipe_study.select(None)] == [s.name for s in recipe_study.GRID]
    assert [s.name for s in recipe_study.select(["shift-2", "baseline"])] == ["baseline", "shift-2"]
