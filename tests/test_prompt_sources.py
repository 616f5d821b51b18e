"""Prompt sets as published (issue 22): Arditi et al.'s per-split layout, CSV sets with their own column
names, Hugging Face `datasets` sources, the category column, and their errors.

The per-split layout is built from the toy prompts (mild) in the paper's file names, fields and JSON-array
format; a sweep on it gets the same cell ids as on its canonical merged form used as a single file, and the
same stored direction rows."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from conftest import TOY_MODELS, TOY_PROMPTS

RULE = {"control_margin": {"baseline_min": 0.5, "baseline_margin": 0.5, "control_margin": 0.25,
                           "addition_coefficient": 1.0, "ablation_alpha": 1.0},
        "steering_labels": {"strong": 0.5, "weak": 0.2}}
N = {"n_train": 6, "n_val": 4, "n_test": 3}


def _toy(cls: str) -> pd.DataFrame:
    return pd.read_json(TOY_PROMPTS / f"{cls}.jsonl", lines=True, dtype=False)


def paper_layout(root, per_split: int = 10):
    """`dataset/splits/{harmful,harmless}_{train,val,test}.json` (JSON arrays of {instruction, category}) and
    `dataset/processed/jailbreakbench.json` ({goal-like instruction, category, source}), from toy rows."""
    (root / "dataset" / "splits").mkdir(parents=True)
    (root / "dataset" / "processed").mkdir(parents=True)
    for cls in ("harmful", "harmless"):
        df = _toy(cls)
        for split in ("train", "val", "test"):
            rows = df[df["split"] == split].head(per_split)
            recs = [{"instruction": r.instruction, "category": getattr(r, "category", None) or "none"}
                    for r in rows.itertuples()]
            (root / "dataset" / "splits" / f"{cls}_{split}.json").write_text(json.dumps(recs, indent=4))
    test = _toy("harmful")
    test = test[test["split"] == "test"].iloc[per_split: 2 * per_split]
    (root / "dataset" / "processed" / "jailbreakbench.json").write_text(json.dumps(
        [{"instruction": r.instruction, "category": r.category, "source": "toy"} for r in test.itertuples()],
        indent=4))
    return root


def _data(root) -> dict:
    s = root / "dataset" / "splits"
    return {"harmful": {"train": {"path": str(s / "harmful_train.json"), "category_column": "category"},
                        "val": {"path": str(s / "harmful_val.json"), "category_column": "category"},
                        "test": {"path": str(root / "dataset" / "processed" / "jailbreakbench.json"),
                                 "category_column": "category"}},
            "harmless": {"train": str(s / "harmless_train.json"), "val": str(s / "harmless_val.json"),
                         "test": str(s / "harmless_test.json")}, **N}


def _spec(tmp_path, data: dict, name="spec", steer=False) -> str:
    stages = {"directions": {"sites": ["resid_pre"]}}
    if steer:
        stages["steer"] = {"addition": {"layers": [1], "coefficients": [1.0]}, "ablation": None, "controls": False}
    spec = {"name": "sources", "models": [{"name": "qwen-xs", "path": str(TOY_MODELS / "toy-qwen-xs")}],
            "data": data, "seeds": [0, 1], "stages": stages, "generation": {"max_new_tokens": 4},
            "decision_rule": RULE}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def _merged_spec(tmp_path, spec_file: str, steer=False) -> str:
    """Write the spec's prompt sets in their canonical merged form; the spec with the printed data block."""
    from refusal_ray.data import write_merged
    from refusal_ray.spec import load_spec

    text = write_merged(load_spec(spec_file).data, tmp_path / "merged", spec_file)
    return _spec(tmp_path, yaml.safe_load(text)["data"], "merged", steer)


def test_the_papers_layout_unmerged_and_merged_give_the_same_cells_and_directions(tmp_path):
    from refusal_ray.cluster.local import run_local
    from refusal_ray.plan import make_plan

    paper_layout(tmp_path)
    unmerged = _spec(tmp_path, _data(tmp_path), steer=True)
    merged = _merged_spec(tmp_path, unmerged, steer=True)
    block = yaml.safe_load(open(merged))["data"]["harmful"]
    assert block["split_column"] == "split" and block["id_column"] is None and block["category_column"] == "category"
    a, b = make_plan(unmerged), make_plan(merged)
    assert [c.id for c in a.cells] == [c.id for c in b.cells] and len(a.cells) > 0
    assert a.data_fingerprint == b.data_fingerprint and a.fingerprints == b.fingerprints
    for seed in a.prompts:
        for split in ("train", "val", "test"):
            for cls in ("harmful", "harmless"):
                assert a.prompts[seed][split][cls] == b.prompts[seed][split][cls]
    # the test split is JailbreakBench's file, train its own, with its categories
    jbb = json.loads((tmp_path / "dataset" / "processed" / "jailbreakbench.json").read_text())
    test = a.prompts[0]["test"]["harmful"]
    by_text = {r["instruction"]: r["category"] for r in jbb}
    assert set(test.instructions) <= set(by_text) and test.categories == [by_text[t] for t in test.instructions]
    assert not set(a.prompts[0]["train"]["harmful"].instructions) & set(by_text)
    # row ids: the row number in the canonical form (train 0-9, val 10-19, test 20-29)
    assert all(20 <= int(i) < 30 for i in test.ids)
    # the merged file is the canonical bytes, so its byte fingerprint is the set's
    assert a.data_sources["harmful"]["fingerprint"] == b.data_sources["harmful"]["fingerprint"]

    ta, tb = run_local(a, log=lambda *x: None), run_local(b, log=lambda *x: None)
    assert all(r["status"] == "done" for r in ta["cells"] + tb["cells"])

    def directions(t, cell_id):
        return sorted(((r["layer"], r["position"], np.asarray(r["vector"]).tolist()) for r in t["directions"]
                       if r["cell_id"] == cell_id), key=lambda x: x[:2])

    one = next(c.id for c in a.cells if c.stage == "directions")
    assert directions(ta, one) and directions(ta, one) == directions(tb, one)
    # the category lands in the completions table: the source's category for harmful rows, None for harmless
    comps = pd.DataFrame(ta["completions"])
    harm = comps[comps["prompt_set"] == "harmful"]
    assert harm["category"].tolist() == [by_text[p] for p in harm["prompt"]]
    harmless = comps[comps["prompt_set"] == "harmless"]
    assert harmless["category"].isna().all() and len(harmless) > 0


def test_single_file_form_is_unchanged_and_category_column_is_out_of_the_dump(tmp_path):
    from refusal_ray.data import files_fingerprint
    from refusal_ray.plan import make_plan
    from refusal_ray.spec import load_spec

    data = {"harmful": {"path": str(TOY_PROMPTS / "harmful.jsonl")},
            "harmless": {"path": str(TOY_PROMPTS / "harmless.jsonl")}, **N}
    plain = _spec(tmp_path, data, "plain")
    spec = load_spec(plain)
    assert "category_column" not in spec.model_dump(mode="json")["data"]["harmful"]
    plan = make_plan(plain)
    assert plan.data_fingerprint == files_fingerprint([TOY_PROMPTS / "harmful.jsonl", TOY_PROMPTS / "harmless.jsonl"])
    assert plan.prompts[0]["test"]["harmful"].categories == [None] * N["n_test"]
    with_cat = _spec(tmp_path, {**data, "harmful": {**data["harmful"], "category_column": "category"}}, "cat")
    cat_plan = make_plan(with_cat)
    assert [c.id for c in cat_plan.cells] == [c.id for c in plan.cells]   # the category is not in the id
    toy = _toy("harmful").set_index("id")["category"]
    ps = cat_plan.prompts[0]["test"]["harmful"]
    assert ps.categories == [toy[i] for i in ps.ids]


def test_csv_sets_with_their_own_column_names(tmp_path):
    """AdvBench `goal`, HarmBench `Behavior` (with its category), StrongREJECT `forbidden_prompt`."""
    from refusal_ray.plan import make_plan

    harm, harmless = _toy("harmful"), _toy("harmless")
    cols = {"train": ("advbench.csv", "goal", None), "val": ("harmbench.csv", "Behavior", "SemanticCategory"),
            "test": ("strongreject.csv", "forbidden_prompt", "category")}
    data = {"harmful": {}, "harmless": {}, **N}
    for split, (name, col, cat) in cols.items():
        rows = harm[harm["split"] == split].head(8)
        df = pd.DataFrame({col: rows["instruction"], "target": "x"})
        if cat:
            df[cat] = rows["category"].tolist()
        df.to_csv(tmp_path / name, index=False)
        data["harmful"][split] = {"path": str(tmp_path / name), "instruction_column": col,
                                  **({"category_column": cat} if cat else {})}
        h = harmless[harmless["split"] == split].head(8)
        h[["instruction"]].to_csv(tmp_path / f"harmless_{split}.csv", index=False)
        data["harmless"][split] = str(tmp_path / f"harmless_{split}.csv")
    plan = make_plan(_spec(tmp_path, data))
    for split in ("train", "val", "test"):
        want = set(harm[harm["split"] == split].head(8)["instruction"])
        assert set(plan.prompts[0][split]["harmful"].instructions) <= want
    assert plan.prompts[0]["train"]["harmful"].categories == [None] * N["n_train"]
    cats = dict(zip(harm["instruction"], harm["category"]))
    val = plan.prompts[0]["val"]["harmful"]
    assert val.categories == [cats[t] for t in val.instructions]
    merged = make_plan(_merged_spec(tmp_path, _spec(tmp_path, data)))
    assert [c.id for c in merged.cells] == [c.id for c in plan.cells]


def test_xstest_one_csv_split_into_harmful_and_harmless_by_its_label(tmp_path):
    """XSTest's `prompt` + `label` (safe/unsafe) in one CSV: `where` picks each class's rows; ids stay the
    file's row numbers; the plan without `where` fields dumps as before (absent at None)."""
    from refusal_ray.plan import make_plan
    from refusal_ray.spec import load_spec

    harm, harmless = _toy("harmful").head(15), _toy("harmless").head(15)
    rows = pd.concat([pd.DataFrame({"prompt": harm["instruction"], "label": "unsafe", "type": harm["category"]}),
                      pd.DataFrame({"prompt": harmless["instruction"], "label": "safe", "type": "none"})])
    rows = rows.sample(frac=1.0, random_state=0).reset_index(drop=True)
    rows.to_csv(tmp_path / "xstest.csv", index=False)
    src = {"path": str(tmp_path / "xstest.csv"), "instruction_column": "prompt", "id_column": None,
           "split_column": None, "category_column": "type"}
    f = _spec(tmp_path, {"harmful": {**src, "where": {"label": "unsafe"}},
                         "harmless": {**src, "where": {"label": ["safe"]}}, **N})
    plan = make_plan(f)
    for split in ("train", "val", "test"):
        for cls, label in (("harmful", "unsafe"), ("harmless", "safe")):
            ps = plan.prompts[0][split][cls]
            assert [rows.loc[int(i), "label"] for i in ps.ids] == [label] * len(ps)
            assert ps.instructions == [rows.loc[int(i), "prompt"] for i in ps.ids]
    assert load_spec(f).model_dump(mode="json")["data"]["harmful"]["where"] == {"label": "unsafe"}


def test_datasets_sources_load_from_disk_and_local_parquet(tmp_path):
    datasets = pytest.importorskip("datasets")
    from refusal_ray.plan import make_plan

    harm, harmless = _toy("harmful"), _toy("harmless")
    disk = tmp_path / "harmful_ds"
    datasets.DatasetDict({s: datasets.Dataset.from_dict(
        {"prompt": harm[harm["split"] == s]["instruction"].head(8).tolist(),
         "category": harm[harm["split"] == s]["category"].head(8).tolist()}) for s in ("train", "val", "test")}
    ).save_to_disk(str(disk))
    parquet = tmp_path / "harmless.parquet"
    h = harmless.groupby("split").head(8)
    datasets.Dataset.from_dict({"text": h["instruction"].tolist(), "part": h["split"].tolist()}).to_parquet(
        str(parquet))
    data = {"harmful": {s: {"dataset": str(disk), "split": s, "instruction_column": "prompt",
                            "category_column": "category"} for s in ("train", "val", "test")},
            "harmless": {"dataset": "parquet", "data_files": str(parquet), "instruction_column": "text",
                         "split_column": "part"}, **N}
    spec_file = _spec(tmp_path, data)
    plan = make_plan(spec_file)
    for split in ("train", "val", "test"):
        assert set(plan.prompts[0][split]["harmful"].instructions) <= set(harm[harm["split"] == split]["instruction"])
        assert set(plan.prompts[0][split]["harmless"].instructions) <= set(h[h["split"] == split]["instruction"])
    assert plan.data_sources["harmful"]["splits"]["test"]["kind"] == "load_from_disk"
    assert plan.data_sources["harmless"]["kind"] == "local" and plan.data_sources["harmless"]["dataset_fingerprint"]
    # stage patch / scrub draw pairs from the frames with the spec's blocks (stages/base.py)
    from refusal_ray.data import draw_pairs
    from refusal_ray.spec import load_spec

    data_spec = load_spec(spec_file).data
    pairs = draw_pairs(plan.frames["harmful"][0], plan.frames["harmless"][0], data_spec.harmful, data_spec.harmless,
                       3, 0)
    assert set(pairs.harmful.instructions) <= set(harm[harm["split"] == "test"]["instruction"])
    assert set(pairs.harmless.instructions) <= set(h[h["split"] == "test"]["instruction"])
    # a local parquet file named directly, and the merged form, give the same cells
    direct = _spec(tmp_path, {**data, "harmless": {**data["harmless"], "dataset": str(parquet),
                                                   "data_files": None}}, "direct")
    assert [c.id for c in make_plan(direct).cells] == [c.id for c in plan.cells]
    assert [c.id for c in make_plan(_merged_spec(tmp_path, spec_file)).cells] == [c.id for c in plan.cells]


def test_a_datasets_source_without_the_package_names_the_field_and_the_extra(tmp_path, monkeypatch):
    from refusal_ray.errors import SpecError
    from refusal_ray.plan import make_plan

    monkeypatch.setitem(sys.modules, "datasets", None)   # import datasets -> ImportError
    data = {"harmful": {"dataset": str(tmp_path / "x")}, "harmless": {"path": str(TOY_PROMPTS / "harmless.jsonl")}}
    f = _spec(tmp_path, {**data, **N})
    with pytest.raises(SpecError) as e:
        make_plan(f)
    assert str(e.value) == (f"{f}: data.harmful.dataset: a `datasets` source needs the datasets package: "
                            "pip install 'refusal-ray[datasets]'")


def test_a_hub_dataset_offline_is_listed_by_validate(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    from refusal_ray.plan import make_plan

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = {"harmful": {"dataset": "someone/some-prompts", "split": "train", "split_column": "split"},
            "harmless": {"path": str(TOY_PROMPTS / "harmless.jsonl")}, **N}
    plan = make_plan(_spec(tmp_path, data), offline_ok=True)
    assert plan.cells == [] and plan.unchecked == [
        "data.harmful.dataset (hub dataset 'someone/some-prompts'): rows, columns and draws, and so the prompt "
        "fingerprints, tokenizers' chat rendering and cell ids"]


def _validate(spec_file: str) -> tuple[int, str]:
    from refusal_ray.cli import app

    r = CliRunner().invoke(app, ["validate", spec_file])
    return r.exit_code, r.output.strip()


def test_bad_prompt_sources_are_one_line_errors(tmp_path):
    paper_layout(tmp_path)
    good = _data(tmp_path)
    s = tmp_path / "dataset" / "splits"
    (tmp_path / "empty.json").write_text("[]")
    harmful = good["harmful"]
    cases = [
        ({**harmful, "test": {"path": str(tmp_path / "nope.json")}},
         "data.harmful.test.path", f"file not found: {tmp_path / 'nope.json'}"),
        ({"train": harmful["train"], "val": harmful["val"]}, "data.harmful.test", "Field required"),
        ({**harmful, "test": {**harmful["test"], "split_column": "split"}}, "data.harmful.test.split_column",
         "a per-split source takes its split from its key (train/val/test); drop split_column, or give one file "
         "with a split column as data.<class>: {path: ..., split_column: ...}"),
        ({**harmful, "val": {"path": str(s / "harmful_val.json"), "instruction_column": "goal"}},
         "data.harmful.val.instruction_column",
         f"column 'goal' not in {s / 'harmful_val.json'} (columns: instruction, category)"),
        ({**harmful, "train": {"path": str(tmp_path / "empty.json")}}, "data.harmful.train.path",
         f"prompt file is empty: {tmp_path / 'empty.json'}"),
        ({**harmful, "test": {**harmful["test"], "colour": "red"}}, "data.harmful.test.colour", "unknown key"),
        ({**harmful, "train": {**harmful["train"], "id_column": "category"}}, "data.harmful.val.id_column",
         "missing: another split names an id column; give id_column on every split or on none"),
        ({**harmful, "val": {**harmful["val"], "where": {"label": "unsafe"}}}, "data.harmful.val.where",
         f"column 'label' not in {s / 'harmful_val.json'} (columns: instruction, category)"),
        ({**harmful, "val": {**harmful["val"], "where": {"category": "no-such"}}}, "data.harmful.val.where",
         f"no row of {s / 'harmful_val.json'} matches {{'category': 'no-such'}}"),
    ]
    for i, (src, field, msg) in enumerate(cases):
        f = _spec(tmp_path, {**good, "harmful": src}, f"bad{i}")
        assert _validate(f) == (2, f"error: {f}: {field}: {msg}")
    # too few rows in a split
    f = _spec(tmp_path, {**good, "n_test": 11}, "few")
    code, out = _validate(f)
    assert code == 2 and out.startswith(f"error: {f}: data.harmful: ") and "split 'test' has 10 rows" in out


def test_prompts_merge_cli_writes_the_files_and_a_block_with_the_same_cell_ids(tmp_path):
    from refusal_ray.cli import app
    from refusal_ray.plan import make_plan

    paper_layout(tmp_path)
    spec_file = _spec(tmp_path, _data(tmp_path))
    r = CliRunner().invoke(app, ["prompts", "merge", spec_file, "--out", str(tmp_path / "cli")])
    assert r.exit_code == 0, r.output
    block = yaml.safe_load(r.output)["data"]
    assert block["harmful"]["path"] == str(tmp_path / "cli" / "harmful.jsonl")
    assert block["harmful"]["category_column"] == "category" and "category_column" not in block["harmless"]
    merged = _spec(tmp_path, block, "cli_merged")
    assert [c.id for c in make_plan(merged).cells] == [c.id for c in make_plan(spec_file).cells]


def test_prompts_merge_cli_bad_input_writes_nothing(tmp_path):
    from refusal_ray.cli import app

    paper_layout(tmp_path)
    good = _data(tmp_path)
    bad = _spec(tmp_path, {**good, "harmless": {**good["harmless"], "test": str(tmp_path / "nope.json")}}, "bad")
    r = CliRunner().invoke(app, ["prompts", "merge", bad, "--out", str(tmp_path / "cli")])
    assert (r.exit_code, r.output.strip()) == (2, f"error: {bad}: data.harmless.test.path: file not found: "
                                                  f"{tmp_path / 'nope.json'}")
    assert not (tmp_path / "cli").exists()


def test_validate_lists_an_offline_hub_dataset_as_could_not_check_offline(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = {"harmful": {"dataset": "someone/some-prompts", "split": "train", "split_column": "split"},
            "harmless": {"path": str(TOY_PROMPTS / "harmless.jsonl")}, **N}
    code, out = _validate(_spec(tmp_path, data))
    assert code == 0 and "could not check offline: data.harmful.dataset (hub dataset 'someone/some-prompts')" in out


# -- review fixes (issue 22) -----------------------------------------------------------------------------
def _no_network(monkeypatch):
    """Any hub request fails the test: huggingface_hub.HfApi and datasets.load_dataset of a hub name."""
    import huggingface_hub

    datasets = pytest.importorskip("datasets")

    class NoHub:
        def __init__(self, *a, **k):
            raise AssertionError("a hub request was made")

    real = datasets.load_dataset

    def load_dataset(path, *a, **k):
        if path not in ("parquet", "json", "csv", "arrow"):
            raise AssertionError(f"a hub load_dataset({path!r}) was made")
        return real(path, *a, **k)

    monkeypatch.setattr(huggingface_hub, "HfApi", NoHub)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)


def test_a_mistyped_local_dataset_path_is_file_not_found_with_no_hub_request(tmp_path, monkeypatch):
    _no_network(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here").mkdir()
    harmless = {"path": str(TOY_PROMPTS / "harmless.jsonl")}
    for i, typo in enumerate(["./prompts/harmful.parquet", "prompts/harmful.parquet", "/no/such/dir",
                              "~/no-such-prompts", "harmful.jsonl", "data/prompts/harmful", ".hidden"]):
        f = _spec(tmp_path, {"harmful": {"dataset": typo}, "harmless": harmless, **N}, f"typo{i}")
        assert _validate(f) == (2, f"error: {f}: data.harmful.dataset: file not found: {typo} (a hub dataset is "
                                   f"named owner/name, without a file suffix)")
    # per split too, naming that split's field
    f = _spec(tmp_path, {"harmful": {s: {"dataset": f"./{s}.arrow"} for s in ("train", "val", "test")},
                         "harmless": harmless, **N}, "typo_split")
    assert _validate(f) == (2, f"error: {f}: data.harmful.train.dataset: file not found: ./train.arrow (a hub "
                               f"dataset is named owner/name, without a file suffix)")
    from refusal_ray.data.sources import is_hub_name

    assert is_hub_name("someone/some-prompts") and is_hub_name("squad") and not is_hub_name("here")
    assert not any(map(is_hub_name, ["./a", "/a", "~/a", "a.parquet", "a/b/c", "a/b.jsonl", ".a", "a b"]))


class _FakeHub:
    """huggingface_hub.HfApi and datasets.load_dataset stand-ins: the hub's head is commit HEAD_SHA, any other
    revision asked for resolves to itself; what was asked is recorded in `asked`."""

    HEAD_SHA = "1" * 40

    def __init__(self, monkeypatch, rows: dict):
        import huggingface_hub
        from types import SimpleNamespace

        datasets = pytest.importorskip("datasets")
        self.asked: list = []
        hub = self

        class Api:
            def dataset_info(self, name, revision=None):
                hub.asked.append(("dataset_info", name, revision))
                return SimpleNamespace(sha=revision if revision and len(revision) == 40 else hub.HEAD_SHA)

        def load_dataset(path, *, revision=None, **k):
            hub.asked.append(("load_dataset", path, revision))
            return datasets.Dataset.from_dict(rows)

        monkeypatch.setattr(huggingface_hub, "HfApi", Api)
        monkeypatch.setattr(datasets, "load_dataset", load_dataset)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)


def _hub_rows() -> dict:
    harm = _toy("harmful")
    return {"goal": harm["instruction"].tolist(), "part": harm["split"].tolist()}


def test_a_hub_dataset_records_its_resolved_commit_in_the_manifest(tmp_path, monkeypatch):
    from refusal_ray.plan import make_plan
    from refusal_ray.runner import manifest

    hub = _FakeHub(monkeypatch, _hub_rows())
    data = {"harmful": {"dataset": "someone/some-prompts", "instruction_column": "goal", "split_column": "part",
                        "revision": "main"},
            "harmless": {"path": str(TOY_PROMPTS / "harmless.jsonl")}, **N}
    plan = make_plan(_spec(tmp_path, data))
    rec = manifest(plan)["data_sources"]["harmful"]
    assert (rec["kind"], rec["dataset"], rec["revision"]) == ("hub", "someone/some-prompts", _FakeHub.HEAD_SHA)
    # the branch is resolved once, and the rows are read at that commit, not at the branch
    assert hub.asked == [("dataset_info", "someone/some-prompts", "main"),
                         ("load_dataset", "someone/some-prompts", _FakeHub.HEAD_SHA)]


def test_rejudge_reads_a_hub_dataset_at_the_commit_the_run_recorded(tmp_path, monkeypatch):
    """The stored completions lack their prompt text (a store written before the column): the re-judge reads
    the prompts from the manifest's spec, pinned to the manifest's recorded commit, not the branch's head."""
    from refusal_ray.cluster.judging import completions_with_prompts
    from refusal_ray.spec import load_spec

    hub = _FakeHub(monkeypatch, _hub_rows())
    data = {"harmful": {"dataset": "someone/some-prompts", "instruction_column": "goal", "split_column": "part"},
            "harmless": {"path": str(TOY_PROMPTS / "harmless.jsonl")}, **N}
    spec = load_spec(_spec(tmp_path, data))
    recorded = "2" * 40

    class Stored:   # what completions_with_prompts reads of a store
        def read(self, name):
            return pd.DataFrame({"prompt_set": ["harmful"], "prompt_id": ["0"], "completion": ["x"]})

        def read_json(self, name):
            return {"spec": spec.model_dump(mode="json"), "data_fingerprint": None,
                    "data_sources": {"harmful": {"kind": "hub", "dataset": "someone/some-prompts",
                                                 "revision": recorded}, "harmless": {"kind": "file"}}}

    comps = completions_with_prompts(Stored())
    assert comps["prompt"].tolist() == [_hub_rows()["goal"][0]]
    assert hub.asked == [("dataset_info", "someone/some-prompts", recorded),
                         ("load_dataset", "someone/some-prompts", recorded)]


def test_loading_a_datasets_source_turns_off_its_progress_bars(tmp_path):
    datasets = pytest.importorskip("datasets")
    from refusal_ray.data import load_source
    from refusal_ray.spec import DatasetSource

    parquet = tmp_path / "h.parquet"
    datasets.Dataset.from_dict({"instruction": ["a", "b"]}).to_parquet(str(parquet))
    datasets.enable_progress_bars()
    try:
        load_source(DatasetSource(dataset=str(parquet)), "data.harmful")
        assert not datasets.is_progress_bar_enabled()
    finally:
        datasets.enable_progress_bars()


def _paired_frames():
    """Toy rows with a pair column `twin` (each harmful row's harmless twin: same value), split in `part`."""
    harm, harmless = _toy("harmful"), _toy("harmless")
    n = {s: min((harm["split"] == s).sum(), (harmless["split"] == s).sum(), 8) for s in ("train", "val", "test")}
    out = {}
    for cls, df in (("harmful", harm), ("harmless", harmless)):
        parts = [df[df["split"] == s].head(n[s]).assign(twin=[f"{s}{i}" for i in range(n[s])]) for s in n]
        out[cls] = pd.concat(parts)[["instruction", "split", "twin"]].rename(columns={"split": "part"})
    return out


def _circuit_spec(tmp_path, data: dict, name: str) -> str:
    path = _spec(tmp_path, data, name)
    spec = yaml.safe_load(open(path))
    spec["stages"] |= {"patch": {"sites": ["resid_pre"], "layers": [0, 1], "positions": [-1], "n_pairs": 2},
                       "scrub": {"scrubbed": ["blocks.*.hook_mlp_out"], "n_pairs": 2, "resamples": 1,
                                 "hypotheses": [{"name": "all-mlp", "protected": ["blocks.*.hook_mlp_out"]}]}}
    open(path, "w").write(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_patch_and_scrub_cell_ids_are_the_same_per_split_as_a_dataset_and_merged(tmp_path):
    """A pair column named `twin` in the sources is `pair` in the merged file: stages patch and scrub hash
    the canonical name, so a per-split source, a whole-set `datasets` source and the merged file give the
    same patch and scrub cell ids (and a single file keeps its own column's name: the golden ids)."""
    datasets = pytest.importorskip("datasets")
    from refusal_ray.plan import make_plan

    frames = _paired_frames()
    cols = {"instruction_column": "instruction", "pair_column": "twin"}
    per_split, whole = {}, {}
    for cls, df in frames.items():
        per_split[cls] = {}
        for s in ("train", "val", "test"):
            f = tmp_path / f"{cls}_{s}.json"
            f.write_text(df[df["part"] == s][["instruction", "twin"]].to_json(orient="records"))
            per_split[cls][s] = {"path": str(f), **cols}
        pq = tmp_path / f"{cls}.parquet"
        datasets.Dataset.from_pandas(df, preserve_index=False).to_parquet(str(pq))
        whole[cls] = {"dataset": str(pq), "split_column": "part", **cols}
    ids = {}
    for name, data in (("per_split", per_split), ("dataset", whole)):
        spec_file = _circuit_spec(tmp_path, {**data, **N}, name)
        merged = yaml.safe_load(open(_merged_spec(tmp_path, spec_file)))["data"]
        assert merged["harmful"]["pair_column"] == "pair"
        for form, f in ((name, spec_file), (f"{name} merged", _circuit_spec(tmp_path, merged, f"{name}_merged"))):
            cells = make_plan(f).cells
            ids[form] = sorted(c.id for c in cells if c.stage in ("patch", "scrub"))
            assert {c.stage for c in cells} >= {"patch", "scrub"}
    assert ids["per_split"] == ids["per_split merged"] and ids["dataset"] == ids["dataset merged"]
    assert ids["dataset"] == ids["per_split"] and len(ids["dataset"]) == 4   # 2 seeds x (patch, scrub)


def test_where_takes_numbers_and_booleans(tmp_path):
    from refusal_ray.data.files import apply_where
    from refusal_ray.errors import SpecError
    from types import SimpleNamespace as NS

    df = pd.DataFrame({"flag": [True, False, True], "level": [1, 2, 3], "score": [1.0, 2.0, 2.5],
                       "text": ["True", "false", "x"]})
    keep = lambda where: apply_where(df, NS(where=where), "data.harmful", "s.yaml", "f.csv").index.tolist()  # noqa: E731
    assert keep({"flag": True}) == [0, 2] and keep({"flag": False}) == [1]
    assert keep({"level": [1, 3]}) == [0, 2] and keep({"level": "2"}) == [1]
    assert keep({"score": 2}) == [1] and keep({"score": [2.5]}) == [2] and keep({"score": "1.0"}) == [0]
    assert keep({"text": True}) == [0] and keep({"text": "false"}) == [1]
    with pytest.raises(SpecError) as e:
        keep({"level": [{"a": 1}]})
    assert str(e.value) == "s.yaml: data.harmful.where: level: {'a': 1} is not a text, number or boolean"


def test_a_spec_where_with_numbers_and_booleans_plans_and_dumps_them(tmp_path):
    """The spec types `where` values as text, numbers or booleans (a YAML `label: 1`, `harmful: true`):
    they reach the plan's row selection as written and the dump keeps their type."""
    from refusal_ray.plan import make_plan
    from refusal_ray.spec import load_spec

    harm, harmless = _toy("harmful").head(15), _toy("harmless").head(15)
    rows = pd.concat([pd.DataFrame({"prompt": harm["instruction"], "label": 1, "harmful": True}),
                      pd.DataFrame({"prompt": harmless["instruction"], "label": 0, "harmful": False})])
    rows = rows.sample(frac=1.0, random_state=0).reset_index(drop=True)
    rows.to_csv(tmp_path / "flags.csv", index=False)
    src = {"path": str(tmp_path / "flags.csv"), "instruction_column": "prompt", "id_column": None,
           "split_column": None}
    f = _spec(tmp_path, {"harmful": {**src, "where": {"label": 1, "harmful": True}},
                         "harmless": {**src, "where": {"label": [0]}}, **N})
    plan = make_plan(f)
    for split in ("train", "val", "test"):
        for cls, label in (("harmful", 1), ("harmless", 0)):
            assert [int(rows.loc[int(i), "label"]) for i in plan.prompts[0][split][cls].ids] == \
                [label] * len(plan.prompts[0][split][cls])
    assert load_spec(f).model_dump(mode="json")["data"]["harmful"]["where"] == {"label": 1, "harmful": True}


def test_validate_offline_still_runs_the_stage_checks(tmp_path, monkeypatch):
    """A hub dataset it cannot read leaves the draws unchecked, not the stages' checks against the models."""
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = {"harmful": {"dataset": "someone/some-prompts", "split": "train", "split_column": "split"},
            "harmless": {"path": str(TOY_PROMPTS / "harmless.jsonl")}, **N}
    path = _spec(tmp_path, data, steer=True)
    spec = yaml.safe_load(open(path))
    spec["stages"]["steer"]["addition"]["layers"] = [99]
    open(path, "w").write(yaml.safe_dump(spec, sort_keys=False))
    code, out = _validate(path)
    assert code == 2 and out.startswith(f"error: {path}: stages.steer.addition.layers: "), out
