"""Figures of a benchmark's results (seaborn, saved as PNG and PDF).

* ``final_accuracy``: final average accuracy per variant, mean with a ±1 sd error bar, one dot per seed;
* ``accuracy_curve``: average accuracy on the experiences seen after each experience (joint training has no
  curve: it trains once on the whole stream, so it is drawn as a dashed line at its final accuracy);
* ``forgetting``: average forgetting per variant (not defined for joint training);
* ``accuracy_matrix``: acc[i][j] (after training step i, on experience j), mean over seeds, one panel per variant;
* ``diagnostics``: every numeric per-experience diagnostic that records carry (``strategy_extras.diagnostics``,
  e.g. ITA/IEL's Jensen gap, Fisher spread, task-vector norm); skipped when no record has any.
"""

from __future__ import annotations

from pathlib import Path

from clcompose.bench.report.aggregate import Results, ci95_halfwidth, summary_table


def t_interval(values) -> tuple[float, float]:
    """seaborn's error bar: the mean ± the Student-t 95 % half-width, as in the tables (a point for one seed)."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    mean = float(v.mean())
    half = ci95_halfwidth(float(v.std(ddof=1)), len(v)) if len(v) > 1 else 0.0
    return mean - half, mean + half


FIGURES = ("final_accuracy", "accuracy_curve", "forgetting", "accuracy_matrix", "diagnostics")


def _setup():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper", font_scale=1.1)
    return plt, sns


def _save(fig, base: Path) -> list[Path]:
    """PNG and PDF, without timestamps, so that regenerating unchanged results changes no file."""
    base.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(base.with_suffix(".png"), dpi=150, bbox_inches="tight", metadata={"Software": None})
    fig.savefig(
        base.with_suffix(".pdf"),
        bbox_inches="tight",
        metadata={"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None},
    )
    import matplotlib.pyplot as plt

    plt.close(fig)
    return [base.with_suffix(".png"), base.with_suffix(".pdf")]


def _order(results: Results, benchmark: str) -> list[str]:
    """Variant labels, best final accuracy first (the tables' order), so every figure lists them alike."""
    return list(summary_table(results, benchmark)["label"])


def _palette(sns, order: list[str]) -> dict[str, tuple]:
    return dict(zip(order, sns.color_palette("tab10" if len(order) <= 10 else "husl", len(order))))


def plot_final_accuracy(results: Results, benchmark: str, base: Path) -> list[Path]:
    plt, sns = _setup()
    runs = results.runs[results.runs["benchmark"] == benchmark].assign(acc=lambda d: 100 * d["final_average_accuracy"])
    order = _order(results, benchmark)
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(order) + 1.2))
    sns.barplot(
        data=runs,
        y="label",
        x="acc",
        hue="label",
        order=order,
        hue_order=order,
        palette=_palette(sns, order),
        errorbar=t_interval,
        capsize=0.3,
        err_kws={"linewidth": 1.2},
        legend=False,
        ax=ax,
    )
    sns.stripplot(data=runs, y="label", x="acc", order=order, color="black", size=3.5, alpha=0.7, ax=ax)
    ax.set(
        xlabel="final average accuracy (%), mean ± 95 % CI over seeds",
        ylabel="",
        xlim=(0, 100),
        title=f"{benchmark}: final accuracy",
    )
    return _save(fig, base / "final_accuracy")


def plot_accuracy_curves(results: Results, benchmark: str, base: Path) -> list[Path]:
    plt, sns = _setup()
    runs = results.runs[results.runs["benchmark"] == benchmark]
    order = _order(results, benchmark)
    palette = _palette(sns, order)
    curves = results.curves.merge(runs[["run_id", "label"]], on="run_id")
    curves = curves.assign(acc=100 * curves["accuracy"])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    with_curve = [label for label in order if label in set(curves["label"])]
    if with_curve:
        sns.lineplot(
            data=curves,
            x="step",
            y="acc",
            hue="label",
            hue_order=with_curve,
            palette=palette,
            errorbar=t_interval,
            marker="o",
            ax=ax,
        )
    for label in order:
        if label not in with_curve:  # joint training: no curve, only a final accuracy
            mean = 100 * runs.loc[runs["label"] == label, "final_average_accuracy"].mean()
            ax.axhline(mean, linestyle="--", color=palette[label], label=f"{label} (final only)")
    n_exp = int(runs["n_experiences"].max())
    ax.set(
        xlabel="experiences trained on",
        ylabel="average accuracy on seen experiences (%)",
        ylim=(0, 100),
        xticks=range(1, n_exp + 1),
        title=f"{benchmark}: accuracy after each experience",
    )
    ax.legend(fontsize="small", loc="best")
    return _save(fig, base / "accuracy_curve")


def plot_forgetting(results: Results, benchmark: str, base: Path) -> list[Path] | None:
    plt, sns = _setup()
    runs = results.runs[(results.runs["benchmark"] == benchmark) & results.runs["forgetting"].notna()]
    if runs.empty:
        return None
    runs = runs.assign(f=100 * runs["forgetting"])
    order = [label for label in _order(results, benchmark) if label in set(runs["label"])]
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(order) + 1.2))
    sns.barplot(
        data=runs,
        y="label",
        x="f",
        hue="label",
        order=order,
        hue_order=order,
        palette=_palette(sns, _order(results, benchmark)),
        errorbar=t_interval,
        capsize=0.3,
        err_kws={"linewidth": 1.2},
        legend=False,
        ax=ax,
    )
    sns.stripplot(data=runs, y="label", x="f", order=order, color="black", size=3.5, alpha=0.7, ax=ax)
    ax.set(
        xlabel="average forgetting (%), lower is better; mean ± 95 % CI over seeds",
        ylabel="",
        title=f"{benchmark}: forgetting",
    )
    return _save(fig, base / "forgetting")


def plot_accuracy_matrices(results: Results, benchmark: str, base: Path) -> list[Path]:
    plt, sns = _setup()
    runs = results.runs[results.runs["benchmark"] == benchmark]
    order = _order(results, benchmark)
    cells = results.matrices.merge(runs[["run_id", "label"]], on="run_id")
    mean = cells.groupby(["label", "row", "col"])["accuracy"].mean().mul(100)
    cols = min(3, len(order))
    rows = -(-len(order) // cols)
    n_exp = int(runs["n_experiences"].max())
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False)
    for ax, label in zip(axes.flat, order):
        _heatmap(ax, mean.loc[label].unstack("col").to_numpy(), annotate=n_exp <= 10)
        ax.set_title(label, fontsize="small")
    image = axes.flat[0].images[0]
    for ax in list(axes.flat)[len(order) :]:
        ax.axis("off")
    fig.suptitle(f"{benchmark}: accuracy matrix (%), mean over seeds")
    fig.tight_layout()
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="accuracy (%)")
    return _save(fig, base / "accuracy_matrix")


def _heatmap(ax, m, annotate: bool) -> None:
    """acc[i][j] as an image with its values written in (matplotlib's imshow: seaborn's heatmap redraws the
    whole figure once per panel, which made this figure take seconds)."""
    import matplotlib.pyplot as plt

    rows, cols = m.shape
    ax.imshow(m, vmin=0, vmax=100, cmap="viridis", aspect="equal" if rows > 1 else "auto")
    ax.grid(False)
    cmap = plt.get_cmap("viridis")
    if annotate:
        for i in range(rows):
            for j in range(cols):
                r, g, b, _ = cmap(m[i, j] / 100)
                dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                ax.text(
                    j, i, f"{m[i, j]:.0f}", ha="center", va="center", fontsize=7, color="white" if dark else "black"
                )
    ax.set_xticks(range(cols), [str(j + 1) for j in range(cols)])
    ax.set_xlabel("evaluated experience")
    if rows == 1 and cols > 1:
        ax.set_yticks([])
        ax.set_ylabel("trained on all (joint)")
    else:
        ax.set_yticks(range(rows), [str(i + 1) for i in range(rows)])
        ax.set_ylabel("after experience")


def plot_diagnostics(results: Results, benchmark: str, base: Path) -> list[Path] | None:
    runs = results.runs[results.runs["benchmark"] == benchmark]
    diag = results.diagnostics.merge(runs[["run_id", "label"]], on="run_id")
    if diag.empty:
        return None
    plt, sns = _setup()
    import matplotlib.ticker

    keys = sorted(diag["key"].unique())
    order = [label for label in _order(results, benchmark) if label in set(diag["label"])]
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for i, (ax, key) in enumerate(zip(axes.flat, keys)):
        sns.lineplot(
            data=diag[diag["key"] == key],
            x="experience",
            y="value",
            hue="label",
            hue_order=order,
            palette=_palette(sns, _order(results, benchmark)),
            errorbar=t_interval,
            marker="o",
            legend=i == 0,
            ax=ax,
        )
        ax.set(title=key, xlabel="experiences trained on", ylabel="")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    if axes.flat[0].get_legend() is not None:
        axes.flat[0].legend(fontsize="x-small")
    fig.suptitle(f"{benchmark}: diagnostics recorded by the strategies (mean ± 95 % CI over seeds)")
    fig.tight_layout()
    return _save(fig, base / "diagnostics")


def plot_extra_metrics(results: Results, benchmark: str, base: Path) -> list[Path] | None:
    """One bar panel per extra scalar metric the benchmark's runs record (e.g. probe accuracies, decoding R²)."""
    runs = results.runs[results.runs["benchmark"] == benchmark]
    names = [k for k in results.extra_metrics if k in runs and runs[k].notna().any()]
    if not names:
        return None
    plt, sns = _setup()
    order = _order(results, benchmark)
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    # one row of panels shares the strategy axis (labels once, on the left); a strategy without the metric is empty
    label_width = 0.075 * max(len(str(label)) for label in order)
    fig, axes = plt.subplots(
        rows, cols, figsize=(label_width + 2.6 * cols, rows * (0.3 * len(order) + 1.2)), squeeze=False, sharey=True
    )
    for ax, name in zip(axes.flat, names):
        data = runs[runs[name].notna()]
        sns.barplot(
            data=data,
            y="label",
            x=name,
            hue="label",
            order=order,
            hue_order=order,
            palette=_palette(sns, order),
            errorbar=t_interval,
            capsize=0.3,
            err_kws={"linewidth": 1.2},
            legend=False,
            ax=ax,
        )
        sns.stripplot(data=data, y="label", x=name, order=order, color="black", size=3, alpha=0.7, ax=ax)
        ax.set(xlabel=name, ylabel="")
        ax.tick_params(axis="x", labelsize="small")
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle(f"{benchmark}: extra metrics (mean ± 95 % CI over seeds)")
    fig.tight_layout()
    return _save(fig, base / "extra_metrics")


def plot_benchmark(results: Results, benchmark: str, folder: Path) -> dict[str, list[Path]]:
    """Every figure for ``benchmark`` under ``folder``; returns {figure name: [png, pdf]} for those drawn."""
    import numpy as np

    drawn = {}
    state = np.random.get_state()
    np.random.seed(0)  # the strip plots' jitter: the same records give the same files
    try:
        _draw(results, benchmark, folder, drawn)
    finally:
        np.random.set_state(state)
    return drawn


def _draw(results: Results, benchmark: str, folder: Path, drawn: dict) -> None:
    for name, fn in (
        ("final_accuracy", plot_final_accuracy),
        ("accuracy_curve", plot_accuracy_curves),
        ("forgetting", plot_forgetting),
        ("accuracy_matrix", plot_accuracy_matrices),
        ("diagnostics", plot_diagnostics),
        ("extra_metrics", plot_extra_metrics),
    ):
        paths = fn(results, benchmark, Path(folder))
        if paths:
            drawn[name] = paths
