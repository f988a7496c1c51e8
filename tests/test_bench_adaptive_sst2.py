"""bench/adaptive_sst2.py: the time-to-accuracy table from finished runs (no training)."""

import json
import os

import pytest

from tests.conftest import ROOT, bench_module


def _study():
    return bench_module("adaptive_sst2")


def _run(config, accuracies, times, cpu=None, trainable_end=100):
    epochs = [{"epoch": i + 1, "val_accuracy": a, "train_time_s": t,
               "train_cpu_s": (cpu or times)[i]} for i, (a, t) in enumerate(zip(accuracies,
                                                                              times))]
    return {"strategy": config, "val_accuracy": accuracies[-1], "epochs": epochs,
            "trainable_params_end": trainable_end, "load_average_1min": [1.5, 2.3],
            "settings": {"device": {"kind": "CPU", "name": "x86_64", "count": 2}}}


def test_time_to_accuracy_uses_full_fine_tunings_mean_minus_half_a_point(tmp_path):
    study = _study()
    full = [_run("full", [0.86, 0.875, 0.88], [100, 200, 300]),
            _run("full", [0.85, 0.87, 0.89], [110, 220, 330]),
            _run("full", [0.86, 0.88, 0.87], [90, 180, 270])]
    cached = [_run("autofreeze+cache", [0.87, 0.876, 0.878], [60, 90, 120], cpu=[61, 92, 124]),
              _run("autofreeze+cache", [0.86, 0.874, 0.88], [55, 85, 115]),
              _run("autofreeze+cache", [0.87, 0.88, 0.881], [50, 80, 110])]
    lisa = [_run("lisa", [0.8, 0.82, 0.84], [70, 140, 210])]
    for seed in range(3):
        for config, runs in (("full", full), ("autofreeze+cache", cached), ("lisa", lisa)):
            if seed < len(runs):
                folder = tmp_path / f"seed-{seed}" / study.slug(config)
                folder.mkdir(parents=True)
                (folder / "results.json").write_text(json.dumps(runs[seed]))
    runs = study.finished(str(tmp_path), [0, 1, 2], ["full", "autofreeze+cache", "lisa", "rgn"])
    assert list(runs) == ["full", "autofreeze+cache", "lisa"]
    rows, target = study.table(runs)
    assert target == pytest.approx((0.88 + 0.89 + 0.87) / 3 - 0.005)  # 0.875
    by = {r["config"]: r for r in rows}
    # full: seed 0 reaches 0.875 at epoch 2 (200 s), seed 1 at epoch 3 (330), seed 2 at 2 (180)
    assert by["full"]["reached"] == 3
    assert by["full"]["wall_s_mean"] == pytest.approx((200 + 330 + 180) / 3)
    # cached: epoch 2 (90), epoch 3 (115), epoch 2 (80); CPU of seed 0 is its own column
    assert by["autofreeze+cache"]["wall_s_mean"] == pytest.approx((90 + 115 + 80) / 3)
    assert by["autofreeze+cache"]["cpu_s_mean"] == pytest.approx((92 + 115 + 80) / 3)
    assert by["autofreeze+cache"]["wall_vs_full"] == pytest.approx(285 / 710)
    assert by["lisa"]["reached"] == 0 and by["lisa"]["wall_s_mean"] is None
    text = study.markdown(rows, target)
    assert "| lisa | 1 | 0.8400 ± 0.0000 | 0 of 1 | - | - |" in text
    assert "Goal (autofreeze+cache reaches the target in at most 0.5x the time of full " \
           "fine-tuning): met (wall time 0.40x full's)." in text
    # One seed fewer: not judged.
    rows, target = study.table({"full": full, "autofreeze+cache": cached[:2]})
    assert "not judged yet" in study.markdown(rows, target)
    # --summarize writes the table beside the runs, with the machine, and trains nothing.
    summary = study.summarize(str(tmp_path), [0, 1, 2], ["full", "lisa"])
    assert "| full | 3 |" in summary
    assert ("Ran on: CPU (x86_64, 2); 1-minute load average before and after each run's "
            "training 1.5 to 2.3.") in summary
    assert (tmp_path / "summary.md").exists() and (tmp_path / "summary.json").exists()
    with pytest.raises(SystemExit, match="no finished run"):
        study.summarize(str(tmp_path / "empty"), [0], ["full"])


def test_each_run_is_the_recipe_with_the_studys_settings():
    study = _study()
    argv = study.command(1, "autofreeze+cache", "/out", "/data/train.tsv")
    assert argv[1].endswith(os.path.join("recipes", "bert_text_classification.py"))
    assert argv[2:] == ["--data", "/data/train.tsv", "--strategy", "autofreeze+cache",
                        "--seed", "1", "--output-dir", os.path.join("/out", "seed-1"),
                        "--max-examples", "8000", "--max-validation-examples", "4000",
                        "--epochs", "3", "--no-save-delta"]
    assert study.result_path("/out", 1, "top_layers:2") == os.path.join(
        "/out", "seed-1", "top_layers-2", "results.json")


def test_decision_timelines_and_chart(tmp_path):
    study = _study()
    blocks = ["stem", "transformer_layer_0", "transformer_layer_1", "transformer_layer_2"]
    epochs = [{"epoch": 1, "val_accuracy": 0.8}, {"epoch": 2, "val_accuracy": 0.85}]
    autofreeze = {"step_times_s": [1.0] * 20, "epochs": epochs, "decisions": [
        {"step": 4, "action": "freeze", "groups": ["stem", "transformer_layer_0"]},
        {"step": 9, "action": "freeze", "groups": ["transformer_layer_1"]}],
        "prefix_cache": [{"epoch": 1, "prefix_layers": ["token_embedding",
                                                         "transformer_layer_1"],
                          "cut": ["transformer_layer_1"]}]}
    spans = study.block_timelines(autofreeze, blocks)
    assert spans["stem"] == [(0, 4, True), (5, 19, False)]
    assert spans["transformer_layer_1"] == [(0, 9, True), (10, 19, False)]
    assert spans["transformer_layer_2"] == [(0, 19, True)]
    lisa = {"step_times_s": [1.0] * 20, "epochs": epochs, "decisions": [
        {"step": -1, "action": "sample", "groups": ["transformer_layer_1"]},
        {"step": 9, "action": "sample", "groups": ["transformer_layer_0"]}]}
    spans = study.block_timelines(lisa, blocks)
    assert spans["stem"] == [(0, 19, True)]
    assert spans["transformer_layer_0"] == [(0, 9, False), (10, 19, True)]
    assert spans["transformer_layer_1"] == [(0, 9, True), (10, 19, False)]
    plateau = {"step_times_s": [1.0] * 20, "epochs": epochs, "decisions": [
        {"step": 9, "action": "unfreeze", "groups": ["transformer_layer_2"]}]}
    spans = study.block_timelines(plateau, blocks)
    assert spans["transformer_layer_2"] == [(0, 9, False), (10, 19, True)]
    assert spans["stem"] == [(0, 19, False)]
    pytest.importorskip("matplotlib")
    path = study.decision_chart({"autofreeze+cache": autofreeze, "lisa": lisa},
                                str(tmp_path / "chart.png"), blocks, "title")
    assert os.path.getsize(path) > 1000


def test_the_adaptive_page_quotes_the_committed_seed_0_runs():
    """docs/adaptive.md, "When the cache pays": its numbers are those of the results files."""
    import statistics

    folder = os.path.join(ROOT, "bench", "results", "adaptive_sst2", "seed-0")
    runs = {}
    for config in ("full", "autofreeze", "autofreeze+cache"):
        with open(os.path.join(folder, config, "results.json")) as f:
            runs[config] = json.load(f)
    with open(os.path.join(ROOT, "docs", "adaptive.md")) as f:
        page = " ".join(f.read().split())
    cached, plain = runs["autofreeze+cache"], runs["autofreeze"]
    extension = cached["prefix_cache"][-1]
    assert extension["epoch"] == 2 and "transformer_layer_2" in extension["prefix_layers"]
    median = {c: statistics.median(r["step_times_s"][620:740]) for c, r in runs.items()}
    saved = 250 * (median["autofreeze"] - median["autofreeze+cache"])
    quoted = (f"epoch 3's steps took {median['autofreeze+cache']:.2f} s (median) against "
              f"{median['autofreeze']:.2f} s without the cache ({saved:.0f} s less over the "
              f"epoch), but extending the cache by three transformer layers took "
              f"{extension['seconds']:.0f} s: the cached run's training time was "
              f"{cached['epochs'][-1]['train_time_s']:.0f} s against "
              f"{plain['epochs'][-1]['train_time_s']:.0f} s without the cache.")
    assert quoted in page
    first = [f"{sum(runs[c]['step_times_s'][1:200]):.0f}"
             for c in ("full", "autofreeze", "autofreeze+cache")]
    assert (f"runs of seed 0) took {first[0]}, {first[1]} and {first[2]} s. Every decision "
            "that changes what trains also recompiles the train step under XLA: AutoFreeze's "
            "four freezes in seed 0 cost 17 to 25 s each") in page
    steps = plain["step_times_s"]
    assert [round(steps[d["step"] + 1]) for d in plain["decisions"]] == [25, 19, 17, 19]
    accuracy = ", ".join(f"{e['val_accuracy']:.3f}" for e in runs["full"]["epochs"])
    assert f"(full fine-tuning, seed 0: {accuracy})" in page


def test_the_adaptive_page_states_the_goals_verdict_from_the_committed_summary():
    """docs/adaptive.md's verdict on the goal: the numbers of summary.json and seed 1's run."""
    folder = os.path.join(ROOT, "bench", "results", "adaptive_sst2")
    with open(os.path.join(folder, "summary.json")) as f:
        summary = json.load(f)
    rows = {r["config"]: r for r in summary["rows"]}
    cached = rows["autofreeze+cache"]
    assert cached["seeds"] == 3 and rows["full"]["seeds"] == 3
    with open(os.path.join(folder, "seed-1", "autofreeze+cache", "results.json")) as f:
        seed1 = json.load(f)
    assert seed1["epochs"][-1]["val_accuracy"] < summary["target"]
    first = seed1["decisions"][0]["groups"]
    assert first == ["stem", "transformer_layer_0", "transformer_layer_1"]
    with open(os.path.join(ROOT, "docs", "adaptive.md")) as f:
        page = " ".join(f.read().split())
    assert (f"The goal is not met: AutoFreeze with the cache reached the target in "
            f"{cached['reached']} of 3 seeds, at the end of epoch {cached['epoch_mean']:g}, and "
            f"there it needed {cached['wall_vs_full']:.2f}x the wall time of full "
            "fine-tuning, not 0.5x.") in page


def _results(*configs):
    """The study's summary.json, its rows by configuration, each config's 3 runs, and
    docs/adaptive.md with its whitespace collapsed."""
    folder = os.path.join(ROOT, "bench", "results", "adaptive_sst2")
    with open(os.path.join(folder, "summary.json")) as f:
        summary = json.load(f)
    runs = {}
    for config in configs:
        runs[config] = []
        for seed in (0, 1, 2):
            with open(os.path.join(folder, f"seed-{seed}", config, "results.json")) as f:
                runs[config].append(json.load(f))
    with open(os.path.join(ROOT, "docs", "adaptive.md")) as f:
        page = " ".join(f.read().split())
    return summary, {r["config"]: r for r in summary["rows"]}, runs, page


def test_the_adaptive_page_quotes_the_rgn_gradual_and_plateau_rows():
    """docs/adaptive.md, "What the other rows say": summary.json and the runs' decisions."""
    _, rows, runs, page = _results("rgn", "gradual", "plateau")
    for config in runs:
        assert rows[config]["seeds"] == 3 and rows[config]["reached"] == 0
    full = rows["full"]["total_wall_s_mean"]

    def row(config):
        r = rows[config]
        return (f"{r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f}",
                f"{r['total_wall_s_mean']:.0f} s", f"{r['total_wall_s_mean'] / full:.2f}x")

    accuracy, seconds, ratio = row("rgn")
    assert (f"(`rgn`) ended at {accuracy}, and its 3 epochs took {seconds}, {ratio} full "
            f"fine-tuning's {full:.0f} s") in page
    rescales = [d for r in runs["rgn"] for d in r["decisions"]]
    assert len(rescales) == 45 and {d["action"] for d in rescales} == {"rescale"}
    tops = {max(d["measurement"]["scales"].items(), key=lambda kv: kv[1])[0] for d in rescales}
    assert tops == {"segment_embedding/embeddings"}
    floored = [sum(s <= 0.0101 for s in d["measurement"]["scales"].values()) for d in rescales]
    counts = {len(d["measurement"]["scales"]) for d in rescales}
    assert (f"{min(floored)} to {max(floored)} of the {counts.pop()} scaled tensors sat at the "
            "floor of 0.01") in page and not counts
    accuracy, seconds, ratio = row("gradual")
    every = {r["unfreeze_every_steps"] for r in runs["gradual"]}
    assert (f"every {every.pop()} steps) ended at {accuracy}, its 3 epochs in {seconds} "
            f"({ratio})") in page and not every
    assert all(r["decisions"] == [] and r["trainable_params_end"] == 770
               for r in runs["plateau"])
    losses = ", ".join(f"{e['val_loss']:.3f}" for e in runs["plateau"][0]["epochs"])
    accuracy, _, _ = row("plateau")
    assert (f"(seed 0: {losses}), so the 770 parameters of the head were all that trained, "
            f"and it ended at {accuracy}.") in page
    assert {r["seeds"] for r in rows.values()} == {3}
    assert "the study is 24 of them: 3 seeds of each configuration" in page


def test_the_adaptive_page_quotes_the_lisa_row_and_what_its_time_went_to():
    """docs/adaptive.md, "What LISA's row says": summary.json and the runs' step times."""
    summary, rows, runs, page = _results("lisa", "full")
    lisa, full = rows["lisa"], rows["full"]
    accuracies = [[e["val_accuracy"] for e in r["epochs"]] for r in runs["lisa"]]
    reached = [seed for seed, a in enumerate(accuracies) if a[-1] >= summary["target"]]
    assert all(max(a[:2]) < summary["target"] for a in accuracies)  # epochs 1 and 2: below
    assert lisa["seeds"] == 3 and lisa["reached"] == len(reached) == 2 and lisa["epoch_mean"] == 3
    assert (f"{lisa['accuracy_mean']:.3f} ± {lisa['accuracy_std']:.3f}, at the target in 2 of 3 "
            f"seeds ({reached[0]} and {reached[1]}), both only after the third epoch") in page
    # the slowest configuration of all
    assert max(rows.values(), key=lambda r: r["total_wall_s_mean"])["config"] == "lisa"
    assert (f"its 3 epochs took {lisa['total_wall_s_mean']:.0f} s, "
            f"{lisa['total_wall_s_mean'] / full['total_wall_s_mean']:.2f}x full fine-tuning's "
            f"{full['total_wall_s_mean']:.0f} s") in page

    def span(values, fmt):
        return f"{min(values):{fmt}} to {max(values):{fmt}}"

    assert (f"their median was {span([r['median_step_s'] for r in runs['lisa']], '.2f')} s, "
            f"full fine-tuning's {span([r['median_step_s'] for r in runs['full']], '.2f')} s"
            ) in page
    # the steps that compiled: the first and one after each resampling
    compiled = [[t for t in r["step_times_s"] if t > 5] for r in runs["lisa"]]
    assert all(len(c) == len(r["decisions"]) == 15 for c, r in zip(compiled, runs["lisa"]))
    trained = [r["epochs"][-1]["train_time_s"] for r in runs["lisa"]]
    shares = [sum(c) / t for c, t in zip(compiled, trained)]
    assert (f"the 15 steps that compiled (the first, and one after each of the 14 "
            f"resamplings) took {span([sum(c) for c in compiled], '.0f')} s of each run's "
            f"{span(trained, '.0f')} s of training, "
            f"{min(shares) * 100:.0f} to {max(shares) * 100:.0f} %") in page
