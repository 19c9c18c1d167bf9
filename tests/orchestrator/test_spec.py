"""Experiment specs: loading, overrides, param_space, and 20+ bad specs rejected clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.errors import UserInputError
from orchestrator.spec import (
    EXPERIMENTS_DIR,
    SEARCH_KINDS,
    TOP_LEVEL_KEYS,
    Experiment,
    HessianSpec,
    Resources,
    RobustSetting,
    SearchSpec,
    SelectSpec,
    load_yaml,
    resolve_spec,
)
from trainables.config import AttackConfig, ScheduleConfig, TrainConfig

BASE = {"name": "t", "dataset": "digits", "model": "m1", "batch_sizes": [16, 64]}
CURV = "hessian/eig_1_epoch"


def test_every_shipped_spec_is_valid():
    names = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))
    assert {"demo", "paper-mnist", "paper-cifar10", "paper-cifar100"} <= set(names)
    for name in names:
        exp = Experiment.from_yaml(resolve_spec(name))
        assert exp.num_cells >= 1


def test_demo_spec_matches_the_issue():
    exp = Experiment.from_yaml(resolve_spec("demo"))
    assert exp.dataset == "digits" and exp.model == "m1"
    assert exp.batch_sizes == [16, 64, 256, "full"]
    assert [r.label for r in exp.robust] == ["none", "fgsm-0.1"]
    assert exp.training["target_train_loss"] > 0 and exp.hessian.top_k == 5


def test_param_space_is_a_grid_plus_search_spaces():
    from ray import tune

    exp = Experiment.from_dict(
        {
            **BASE,
            "robust": [{"method": "none"}, {"method": "fgsm", "epsilon": 0.1}],
            "seeds": [0, 1],
            "search": {"space": {"lr": {"loguniform": [0.001, 1.0]}}, "num_samples": 3},
        }
    )
    space = exp.to_param_space()
    assert space["batch_size"] == {"grid_search": [64, 16]}  # largest first
    assert list(space).index("robust") < list(space).index("batch_size")
    assert space["seed"] == {"grid_search": [0, 1]}
    assert [r["method"] for r in space["robust"]["grid_search"]] == ["none", "fgsm"]
    assert isinstance(space["lr"], tune.search.sample.Float)
    assert exp.num_cells == 8


def test_overrides_return_a_new_validated_experiment():
    exp = Experiment.from_dict(BASE)
    new = exp.with_overrides(batch_sizes=[32, 512], **{"training.lr": 0.2})
    assert new.batch_sizes == [32, 512] and new.training["lr"] == 0.2
    assert exp.batch_sizes == [16, 64]
    with pytest.raises(UserInputError, match=r"^override training\.lr: 1 problem"):
        exp.with_overrides(training__lr=-1)
    with pytest.raises(UserInputError, match=r"^--set training\.lr: 1 problem"):
        exp.overridden({"training.lr": -1}, via="--set")


def test_override_errors_show_the_form_the_caller_used():
    exp = Experiment.from_dict(BASE)
    with pytest.raises(UserInputError, match=r"e\.g\. with_overrides\(robust=\[\{'method'"):
        exp.with_overrides(**{"robust.epsilon": 0.2})
    with pytest.raises(UserInputError, match=r"e\.g\. --set robust='\[\{method"):
        exp.overridden({"robust.epsilon": 0.2}, via="--set")
    with pytest.raises(UserInputError, match=r"e\.g\. with_overrides\(seeds=\[\.\.\.\]\)"):
        exp.with_overrides(seeds__x=1)


BAD = [
    ({"batch_sizes": []}, "batch_sizes"),
    ({"batch_sizes": [0]}, "positive integer"),
    ({"batch_sizes": [-4]}, "positive integer"),
    ({"batch_sizes": ["huge"]}, "batch_sizes"),
    ({"batch_sizes": [16, 16]}, "duplicates"),
    ({"batch_sizes": [5000]}, "only 1437 examples"),
    ({"robust": []}, "robust"),
    ({"robust": [{"method": "none"}, {"method": "none", "epsilon": 0}]}, "both 'none'"),
    ({"robust": [{"method": "fgsm", "epsilon": -0.1}]}, "greater than or equal to 0"),
    ({"robust": [{"method": "fgsm"}]}, r"robust\.0\.epsilon: method 'fgsm' needs epsilon > 0"),
    (
        {"robust": [{"method": "none"}, {"method": "pgd", "epsilon": 0}]},
        r"robust\.1\.epsilon: method 'pgd' needs epsilon > 0",
    ),
    ({"robust": [{"method": "cw", "epsilon": 0.1}]}, "robust.0.method"),
    ({"robust": [{"method": "pgd", "epsilon": 0.1, "steps": 0}]}, "robust.0.steps"),
    ({"robust": [{"method": "fgsm", "epsilon": 0.1, "adv_fraction": 1.5}]}, "adv_fraction"),
    ({"seeds": []}, "seeds"),
    ({"seeds": [-1]}, r"seeds: got \[-1\]; expected distinct integers >= 0"),
    ({"seeds": [True]}, "seeds.0"),
    ({"batch_sizes": ["16"]}, r"batch_sizes\[0\]: got '16' \(text: write 16 without quotes\)"),
    ({"model": "vgg99"}, "model"),
    ({"dataset": "imagenet"}, "dataset"),
    ({"foo": 1}, r"foo: unknown field; .*experiments/reference\.yaml lists every field"),
    ({"training": {"lrr": 0.1}}, "training.lrr"),
    ({"training": {"batch_size": 8}}, "top level"),
    ({"training": {"lr": 0}}, "lr"),
    ({"training": {"max_epochs": 0}}, "max_epochs"),
    ({"training": {"lr_scaling": "cubic"}}, "lr_scaling"),
    ({"hessian": {"top_k": 0}}, "hessian.top_k"),
    ({"hessian": {"dtype": "float16"}}, "hessian.dtype"),
    ({"hessian": {"criterion": "fast"}}, "hessian.criterion"),
    ({"hessian": {"num_actors": 0}}, "hessian.num_actors"),
    ({"hessian": {"num_actors": 2000}}, "2000 actors for the 1437 training samples"),
    ({"hessian": {"unknown": 1}}, "hessian.unknown"),
    ({"resources": {"gpus": -1}}, "resources.gpus"),
    ({"name": "has space"}, r"name: String should match .* e\.g\. name: my-study"),
    ({"batch_sizes": 16}, r"batch_sizes: .*\(got 16\); give a list of sizes, e\.g\."),
    ({"storage": "ftp://x/y"}, "storage"),
    # booleans are not integers, text is not a boolean, and storage is not empty
    ({"hessian": {"top_k": True}}, r"hessian\.top_k: Input should be a valid integer \(got True"),
    ({"max_failures": True}, r"max_failures: Input should be a valid integer \(got True\)"),
    ({"hessian": {"trace": "yes"}}, r"hessian\.trace: Input should be a valid boolean \(got 'yes'"),
    ({"resources": {"cpus": True}}, r"resources\.cpus: Input should be a valid number \(got True"),
    ({"hessian": {"top_k": "5"}}, r"hessian\.top_k: .*\(got '5'\) \(text: write 5 without quotes"),
    ({"storage": ""}, r"storage: empty; give a folder"),
    ({"storage": "  "}, r"storage: empty; give a folder"),
    ({"search": {"space": {"lr": {"normal": [0, 1]}}}}, "unknown distribution"),
    ({"search": {"space": {"lr": {"loguniform": [0, 1]}}}}, "bounds must be > 0"),
    ({"search": {"space": {"batch_size": {"choice": [1, 2]}}}}, "not a searchable"),
    ({"search": {"num_samples": 0}}, "search.num_samples"),
    ({"search": {"num_samples": 4}}, r"search\.num_samples: 4 samples of an empty search\.space"),
    # an lr step at or after the last epoch never happens
    (
        {"training": {"max_epochs": 20, "lr_schedule": {"type": "step", "epochs": [5, 20]}}},
        r"training\.lr_schedule\.epochs: got \[5, 20\]; a step at or after max_epochs \(20\)",
    ),
    (
        {"training": {"max_epochs": 20, "lr_schedule": {"type": "step", "epochs": 20}}},
        r"training\.lr_schedule\.epochs: every N epochs with N >= max_epochs \(20\) never",
    ),
    # the model must take the data set's images, and input Hessians hold 2 input_k values
    (
        {"model": "c2"},
        r"model: c2 does not fit the 1x8x8 images of digits \(c2 needs image_size >= 16.*\); "
        "use one of c1, m1, mlp, resnet20 for digits",
    ),
    (
        {"hessian": {"input_k": 33}},
        r"hessian\.input_k: 33 eigenvalues .* need 66, but the inputs of digits have 64 values; "
        "use input_k <= 32",
    ),
    ({"select": {"mode": "best"}}, "select.mode"),
    ({"select": {"metric": "hessian/eig_1"}}, "select.metric: not a metric trials report"),
    ({"search": {"metric": "bogus"}}, "search.metric: not a metric trials report"),
    # every value of a search space is checked, not only the first
    ({"search": {"space": {"lr": {"choice": [0.1, -1]}}}}, "search.space.lr: got -1"),
    ({"search": {"space": {"momentum": {"uniform": [0.5, 1.5]}}}}, "search.space.momentum"),
    ({"search": {"space": {"lr": {"loguniform": [0.1, 0.01]}}}}, "lower bound must come first"),
    ({"search": {"space": {"lr": {"quniform": [0.1, 0.5, 0]}}}}, "step q must be > 0"),
    ({"search": {"space": {"lr": {"uniform": ["1e-4x", "1e-2"]}}}}, "bounds must be numbers"),
    ({"hessian": {"top_k": 5, "max_iter": 3}}, "max_iter 3 is below the 5 eigenvalues"),
    ({"hessian": {"input_k": 3, "max_iter": 5}}, "max_iter 5 is below the 6 eigenvalues"),
    ({"search": {"space": {"lr": {"quniform": [0.015, 0.1, 0.01]}}}}, "multiples of q"),
    ({"search": {"space": {"lr": {"quniform": [0.0, 0.1, 0.01]}}}}, "search.space.lr: got 0"),
    # ... and in every grid cell, not only the first (batch_sizes[0] is 64 here)
    (
        {"batch_sizes": [64, 16], "search": {"space": {"micro_batch_size": {"choice": [8, 32]}}}},
        r"search\.space\.micro_batch_size: got 32; expected at most batch_size \(16\)",
    ),
    (
        {"search": {"space": {"hessian_every": {"choice": [1, 3]}}}, "select": {"metric": CURV}},
        "set training.hessian_every: 1",
    ),
    (
        {
            "robust": [
                {"method": "pgd", "epsilon": 0.1},
                {"method": "pgd", "epsilon": 0.1, "steps": 40},
            ]
        },
        "both 'pgd-0.1'",
    ),
    ({"select": {"metric": "hessian/eig_1_epoch"}}, "set training.hessian_every: 1"),
    (
        {"training": {"eval_attack": {"method": "none"}}, "select": {"metric": "test/adv_acc"}},
        "NaN without training.eval_attack",
    ),
    (
        {
            "search": {"scheduler": "asha", "metric": "hessian/eig_1_epoch"},
            "training": {"hessian_every": 2},
        },
        "search.metric",
    ),
]


@pytest.mark.parametrize(("change", "message"), BAD, ids=[str(c) for c, _ in BAD])
def test_bad_specs_exit_2_with_a_message_and_write_nothing(
    change, message, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump({**BASE, **change}))
    with pytest.raises(UserInputError, match=message):
        Experiment.from_yaml(spec)
    assert main(["run", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "hessweep: error:" in err and "problem" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_a_stored_spec_skips_the_checks_newer_than_its_sweep():
    # a sweep started before these checks must still resume and be analysed
    copies = {**BASE, "search": {"num_samples": 3}}
    late_step = {
        **BASE,
        "training": {"max_epochs": 30, "lr_schedule": {"type": "step", "epochs": [10, 20, 30]}},
    }
    for old, field in ((copies, r"search\.num_samples"), (late_step, r"lr_schedule\.epochs")):
        with pytest.raises(UserInputError, match=field):
            Experiment.from_dict(old)
    assert Experiment.from_dict(copies, stored=True).search.num_samples == 3
    stored = Experiment.from_dict(late_step, stored=True)
    assert stored.training["lr_schedule"]["epochs"] == [10, 20, 30]
    # the checks that keep a sweep from failing still hold for stored specs
    with pytest.raises(UserInputError, match="model: c2 does not fit"):
        Experiment.from_dict({**BASE, "model": "c2"}, stored=True)


def test_from_yaml_takes_a_path_or_an_experiment_name():
    assert Experiment.from_yaml("demo") == Experiment.from_yaml(EXPERIMENTS_DIR / "demo.yaml")
    with pytest.raises(UserInputError, match=r"no spec file 'nope\.yaml' and no experiment"):
        Experiment.from_yaml("nope.yaml")


def test_shape_checks_pass_where_the_model_fits_or_no_input_hessian_runs():
    assert Experiment.model_validate({**BASE, "dataset": "mnist", "model": "c2"}).model == "c2"
    assert Experiment.model_validate({**BASE, "hessian": {"input_k": 32}}).hessian.input_k == 32
    off = {**BASE, "hessian": {"input_k": 33, "input_samples": 0}}
    assert Experiment.model_validate(off).hessian.input_k == 33


def test_file_level_errors(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "no spec file" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed")
    assert main(["validate", str(broken)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    assert main(["validate", str(listy)]) == 2
    assert "mapping" in capsys.readouterr().err
    assert main(["validate", "demo", "--set", "nokey"]) == 2
    assert "expected key=value" in capsys.readouterr().err
    assert main(["validate", "demo", "--set", "training={lr: 0.1, lr: 0.2}"]) == 2
    err = capsys.readouterr().err
    assert "duplicate key 'lr'" in err and "--set training" in err


def test_validate_warns_when_the_data_is_not_on_this_machine(tmp_path, capsys):
    spec = tmp_path / "m.yaml"
    root = tmp_path / "data"
    spec.write_text(
        yaml.safe_dump({**BASE, "dataset": "mnist", "data_root": str(root), "batch_sizes": [16]})
    )
    assert main(["validate", str(spec)]) == 0  # valid: the data may be on another machine
    err = capsys.readouterr().err
    assert f"warning: dataset 'mnist', data_root {root}: mnist not found" in err
    assert f"`hessweep download mnist --root {root}`" in err and "refuses to start" in err
    assert main(["validate", "demo"]) == 0  # digits is bundled: no warning
    assert "not found" not in capsys.readouterr().err


def test_validate_prints_the_grid(capsys):
    assert main(["validate", "demo", "--set", "batch_sizes=[32,512]"]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "[32, 512]" in out and "4 trial(s)" in out
    search = "search={space: {lr: {loguniform: [0.001, 0.1]}}, num_samples: 3}"
    assert main(["validate", "demo", "--set", search]) == 0
    assert "3 search sample(s) each: 24 trial(s)" in capsys.readouterr().out


def test_search_values_are_checked_in_every_cell_whatever_the_order(capsys):
    space = "search={space: {micro_batch_size: {choice: [8, 64]}}}"
    for sizes in ("batch_sizes=[256,16]", "batch_sizes=[16,256]"):
        err = _validate_error(capsys, sizes, space)
        assert "search.space.micro_batch_size: got 64; expected at most batch_size (16)" in err


def test_num_trials_counts_grid_values_of_the_search_space_as_tune_does():
    from ray.tune.search.variant_generator import generate_variants

    space = {
        "lr": {"grid": [0.01, 0.1, 0.2]},
        "momentum": {"choice": [0.5, 0.9]},
        "weight_decay": {"grid": [0.0, 0.001]},
    }
    exp = Experiment.from_dict({**BASE, "search": {"space": space, "num_samples": 2}})
    per_sample = len(list(generate_variants(exp.to_param_space())))
    assert exp.num_trials == per_sample * 2 == exp.num_cells * 3 * 2 * 2 == 24


def test_validate_prints_the_trials_tune_runs_for_a_grid_search(capsys):
    grid = "search={space: {lr: {grid: [0.01, 0.1, 0.2]}}, num_samples: 2}"
    assert main(["validate", "demo", "--set", grid]) == 0
    out = capsys.readouterr().out  # 8 cells x 2 samples x 3 lr values
    assert "2 search sample(s) each x 3 lr grid values: 48 trial(s)" in out


def test_unreadable_spec_files_exit_2_naming_the_file(tmp_path, capsys, monkeypatch):
    binary = tmp_path / "utf16.yaml"
    binary.write_bytes(b"\xff\xfen\x00a\x00")
    assert main(["validate", str(binary)]) == 2
    err = capsys.readouterr().err
    assert f"{binary}: not UTF-8 text" in err and "save the spec as UTF-8" in err
    locked = tmp_path / "locked.yaml"
    locked.write_text(yaml.safe_dump(BASE))
    read_text = Path.read_text

    def refuse(self, *args, **kwargs):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", refuse)
    assert main(["validate", str(locked)]) == 2
    err = capsys.readouterr().err
    assert f"{locked}: cannot read the spec (Permission denied)" in err
    assert "Traceback" not in err


DUPLICATES = [
    ("name: a\nbatch_sizes: [16]\nname: b\n", "duplicate key 'name' (first on line 1)", 3),
    (
        "name: a\nbatch_sizes: [16]\ntraining:\n  lr: 0.1\ntraining:\n  max_epochs: 2\n",
        "duplicate key 'training' (first on line 3)",
        5,
    ),
    ("name: a\nbatch_sizes: [16]\nhessian: {top_k: 1, top_k: 2}\n", "duplicate key 'top_k'", 3),
]


@pytest.mark.parametrize(("text", "message", "line"), DUPLICATES, ids=["name", "block", "flow"])
def test_duplicate_yaml_keys_are_refused_with_the_key_and_line(
    text, message, line, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "dup.yaml"
    spec.write_text(text)
    assert main(["validate", str(spec)]) == 2
    err = capsys.readouterr().err
    assert message in err and f'in "{spec}", line {line}' in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dup.yaml"]


def test_an_alias_of_a_mapping_merged_before_is_no_duplicate():
    text = "b: &b {x: 0}\nc: {<<: &a {<<: *b, x: 1}, y: 2}\nd: *a\n"
    assert load_yaml(text)["d"] == {"x": 1}


def test_yaml_merge_keys_may_still_be_overridden():
    text = "base: &b {lr: 0.1, momentum: 0.9}\ntraining:\n  <<: *b\n  lr: 0.2\n"
    assert load_yaml(text)["training"] == {"lr": 0.2, "momentum": 0.9}


def test_yaml_integers_still_fill_number_fields():
    exp = Experiment.from_dict(
        {
            **BASE,
            "robust": [{"method": "fgsm", "epsilon": 1}],
            "hessian": {"cpus_per_actor": 2, "gpus_per_actor": 0, "trace_rtol": 0.1},
            "resources": {"cpus": 2, "gpus": 0},
            "training": {"lr": 1},
        }
    )
    assert exp.resources.cpus == 2.0 and isinstance(exp.resources.cpus, float)
    assert exp.robust[0].epsilon == 1.0 and exp.hessian.cpus_per_actor == 2.0


def test_exponents_without_a_dot_are_numbers_in_specs_and_set(tmp_path):
    spec = tmp_path / "exp.yaml"
    spec.write_text("name: e\nbatch_sizes: [16]\nhessian: {tol: 1e-6}\ntraining: {lr: 5e-2}\n")
    exp = Experiment.from_yaml(spec)  # PyYAML alone reads 1e-6 as text
    assert exp.hessian.tol == 1e-6 and exp.training["lr"] == 0.05
    assert main(["validate", str(spec), "--set", "training.lr=1e-3"]) == 0
    assert main(["validate", str(spec), "--set", "hessian.tol='1e-6'"]) == 2  # quoted: text


def test_reference_spec_lists_every_field_at_its_default():
    path = EXPERIMENTS_DIR / "reference.yaml"
    ref = yaml.safe_load(path.read_text())
    sections = [
        (Experiment, ref),
        (RobustSetting, ref["robust"][0]),
        (SearchSpec, ref["search"]),
        (SelectSpec, ref["select"]),
        (HessianSpec, ref["hessian"]),
        (Resources, ref["resources"]),
    ]
    for model, shown in sections:
        missing = set(model.model_fields) - set(shown)
        assert not missing, f"{model.__name__} fields missing from reference.yaml: {missing}"
    for config, shown in [
        (TrainConfig, {**ref["training"], **dict.fromkeys(TOP_LEVEL_KEYS), "data_root": None}),
        (AttackConfig, ref["training"]["eval_attack"]),
        (ScheduleConfig, ref["training"]["lr_schedule"]),
    ]:
        assert set(config.__dataclass_fields__) <= set(shown), config.__name__
    text = path.read_text()
    assert all(f"{{{kind}: [" in text for kind in SEARCH_KINDS)
    exp = Experiment.from_yaml(path)
    plain = Experiment(name=exp.name, batch_sizes=exp.batch_sizes)
    skip = {"description", "search", "select", "training"}
    assert exp.model_dump(exclude=skip) == plain.model_dump(exclude=skip)
    assert exp.search == SearchSpec() and exp.select == SelectSpec()
    assert TrainConfig.from_dict(exp.training) == TrainConfig()


def test_yaml_round_trip(tmp_path):
    exp = Experiment.from_yaml(resolve_spec("demo"))
    path = Path(tmp_path / "again.yaml")
    path.write_text(exp.to_yaml())
    assert Experiment.from_yaml(path) == exp


def test_curvature_selection_is_allowed_when_the_last_epoch_reports_it():
    training = {"hessian_every": 5, "max_epochs": 20}
    exp = Experiment.from_dict({**BASE, "training": training, "select": {"metric": CURV}})
    assert exp.select.metric == CURV
    with pytest.raises(UserInputError, match="hessian_every: 1"):  # a target may stop at 7
        Experiment.from_dict(
            {
                **BASE,
                "training": {**training, "target_train_loss": 0.1},
                "select": {"metric": CURV},
            }
        )


def _validate_error(capsys, *sets: str) -> str:
    """``hessweep validate demo --set ...``'s error text, checked to exit 2."""
    args = ["validate", "demo"]
    for item in sets:
        args += ["--set", item]
    assert main(args) == 2
    return capsys.readouterr().err


def test_cuda_trials_need_gpus(capsys):
    err = _validate_error(capsys, "training.device=cuda")
    assert "training.device: 'cuda' needs a GPU, but resources.gpus is 0" in err
    assert "set resources.gpus > 0 (e.g. 0.25) or use device auto" in err
    err = _validate_error(capsys, "search={space: {device: {choice: [cpu, 'cuda:0']}}}")
    assert "search.space.device: 'cuda:0' needs a GPU" in err
    assert (
        main(["validate", "demo", "--set", "training.device=cuda", "--set", "resources.gpus=0.25"])
        == 0
    )


@pytest.mark.parametrize(
    "item",
    [
        "training.lr=1e-3",
        "training.eval_attack={epsilon: 1E-1}",
        "search={space: {lr: {choice: [0.1, 1e-2]}}}",
    ],
)
def test_exponents_without_a_dot_are_read_as_numbers(item, capsys):
    # PyYAML (YAML 1.1) reads 1e-3 as text; the spec loader reads it as YAML 1.2 does
    assert main(["validate", "demo", "--set", item]) == 0


@pytest.mark.parametrize(
    ("item", "shown"),
    [
        ("training.max_epochs=1e3", "training.max_epochs: got 1000.0; expected an integer >= 1"),
        ("hessian.top_k=1e1", "hessian.top_k: Input should be a valid integer (got 10.0)"),
    ],
)
def test_an_exponent_for_an_integer_is_named(item, shown, capsys):
    assert shown in _validate_error(capsys, item)


@pytest.mark.parametrize(
    ("item", "line"),
    [
        (
            "batch_sizes=[16,1e3]",
            'batch_sizes[1]: got 1000.0; expected a positive integer or "full"',
        ),
        (
            "batch_sizes=[Full]",
            "batch_sizes[0]: got 'Full'; expected a positive integer or \"full\"",
        ),
    ],
)
def test_a_bad_batch_size_is_one_line(item, line, capsys):
    err = _validate_error(capsys, item)
    assert "1 problem(s)" in err and f"  - {line}\n" in err


def test_a_misspelled_training_key_is_named_once_with_the_close_key(capsys):
    err = _validate_error(capsys, "training.max_epoch=3")
    assert "training: training" not in err
    assert "  - training.max_epoch: unknown training key (did you mean max_epochs?)" in err


def test_field_messages_do_not_repeat_the_field(capsys):
    err = _validate_error(capsys, "robust=[{method: none}, {method: none}]")
    assert "  - robust[1] and robust[0] are both 'none'" in err


def test_setting_inside_robust_says_to_set_the_whole_list(capsys):
    err = _validate_error(capsys, "robust.epsilon=0.2")
    assert "--set robust.epsilon: robust is a list of settings, not a mapping" in err
    assert "--set robust='[{method: fgsm, epsilon: 0.2}]'" in err
    fixed = "robust=[{method: fgsm, epsilon: 0.2}]"
    assert main(["validate", "demo", "--set", fixed]) == 0


def test_override_errors_name_the_set_key_that_caused_them(capsys):
    err = _validate_error(capsys, "seeds=[0, 1]", "training.lr=-1")
    assert "error: --set training.lr: 1 problem(s)" in err
    assert "overrides" not in err and "--set seeds" not in err
    err = _validate_error(capsys, "training={lr: -1}")
    assert "error: --set training: 1 problem(s)" in err
